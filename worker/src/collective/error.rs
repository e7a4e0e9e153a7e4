//! The one error type every collective failure is, so that a caller can
//! `err.downcast_ref::<CollectiveError>()` and decide whether to retry the
//! stage in a new generation (peer lost, timeout, abort) or give up (bad token,
//! bad configuration, a protocol bug).

use std::time::Duration;

#[derive(Debug, Clone, thiserror::Error)]
pub enum CollectiveError {
    /// The connection to a neighbour failed or it closed it mid-generation.
    #[error("collective peer {peer} lost: {detail}")]
    PeerLost { peer: String, detail: String },
    /// A neighbour sent nothing for longer than the I/O timeout.
    #[error("collective peer {peer} sent nothing for {waited:?}")]
    Timeout { peer: String, waited: Duration },
    /// The abort flag was set (the coordinator started another generation).
    #[error("collective aborted")]
    Aborted,
    /// A neighbour refused our token.
    #[error("collective peer {peer} refused our token: {detail}")]
    Unauthenticated { peer: String, detail: String },
    /// A neighbour runs another generation than ours.
    #[error("collective peer {peer} refused generation {generation}: {detail}")]
    GenerationRefused {
        peer: String,
        generation: u64,
        detail: String,
    },
    /// A neighbour sent something the ring does not expect (a different buffer
    /// length on the two ranks, a chunk out of order): a bug, not a fault.
    #[error("collective protocol error from {peer}: {detail}")]
    Protocol { peer: String, detail: String },
    /// Bad arguments (rank out of range, wrong number of peers, TLS files, runtime kind).
    #[error("collective set-up: {0}")]
    Config(String),
    /// The collective server could not bind or serve.
    #[error("collective server: {0}")]
    Server(String),
    /// An earlier call on this ring failed; its stream state is lost, so the
    /// ring cannot be used again (build a new one for the next generation).
    #[error("this ring failed earlier and cannot be reused: {0}")]
    Poisoned(Box<CollectiveError>),
}

impl CollectiveError {
    /// Whether the stage may succeed if restarted in a new generation (a peer
    /// died or stalled, or the coordinator aborted us), as opposed to a failure
    /// that a restart would repeat.
    pub fn is_retryable(&self) -> bool {
        match self {
            CollectiveError::PeerLost { .. }
            | CollectiveError::Timeout { .. }
            | CollectiveError::Aborted
            | CollectiveError::GenerationRefused { .. } => true,
            CollectiveError::Poisoned(inner) => inner.is_retryable(),
            CollectiveError::Unauthenticated { .. }
            | CollectiveError::Protocol { .. }
            | CollectiveError::Config(_)
            | CollectiveError::Server(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_or_not() {
        let (peer, detail) = (String::from("p"), String::from("x"));
        let unauth = CollectiveError::Unauthenticated {
            peer: peer.clone(),
            detail: detail.clone(),
        };
        assert!(!unauth.is_retryable());
        let lost = CollectiveError::PeerLost {
            peer: peer.clone(),
            detail: detail.clone(),
        };
        assert!(lost.is_retryable());
        let gen = CollectiveError::GenerationRefused {
            peer,
            generation: 3,
            detail,
        };
        assert!(gen.is_retryable());
        assert!(CollectiveError::Poisoned(Box::new(CollectiveError::Aborted)).is_retryable());
        let any: anyhow::Error = CollectiveError::Aborted.into();
        assert!(matches!(
            any.downcast_ref::<CollectiveError>(),
            Some(CollectiveError::Aborted)
        ));
    }
}
