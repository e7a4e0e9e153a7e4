//! Ring all-reduce over gRPC (filled in by the collective work).
