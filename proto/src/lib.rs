//! The agent↔writer protocol, package `reverser.v1`, generated from `proto/reverser/v1/writer.proto`.
//!
//! Data flow: the agent opens one `Writer.Sync` stream, sends `Hello`, declares `Destination`s, then streams
//! `Upsert`/`Delete` and `SnapshotBegin`/`SnapshotEnd` messages; the writer answers with `Ack` (pushed),
//! `Reject` (bad input) and `DestinationStatus`. `WriterAdmin` is a small unary service for grpcurl users.
//! [`FILE_DESCRIPTOR_SET`] feeds gRPC server reflection.

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("reverser.v1");
}

/// Encoded `FileDescriptorSet` of every message and service in `reverser.v1` (and its imports), for
/// `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/reverser_descriptor.bin"));

/// Protocol version this crate describes (`Hello.protocol_version`).
pub const PROTOCOL_VERSION: u32 = 1;
