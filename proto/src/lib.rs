//! gRPC messages and services shared by the coordinator and the workers, and
//! the security every call goes through (token, TLS, message bounds).

pub mod auth;

#[allow(clippy::all)]
pub mod v1 {
    tonic::include_proto!("rlhf.v1");
}

#[cfg(test)]
mod tests {
    use super::v1::*;
    use prost::Message;

    #[test]
    fn register_request_round_trips_through_protobuf_bytes() {
        let req = RegisterRequest {
            host: "node-a".into(),
            device_kind: "cpu".into(),
            device_memory_bytes: 24 << 30,
            peer_address: "127.0.0.1:5000".into(),
            version: "0.1.0".into(),
        };
        let bytes = req.encode_to_vec();
        let back = RegisterRequest::decode(bytes.as_slice()).unwrap();
        assert_eq!(back, req);
        assert_eq!(back.device_memory_bytes, 24 << 30);
    }
}
