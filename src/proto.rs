//! Generated protobuf and tonic code for the wire contract in `proto/`.
//!
//! Only the transport adapters (`rpc`, `connect`) use these types; domain modules never do.

#![allow(clippy::all, missing_docs)]

pub mod process {
    tonic::include_proto!("process");
}

pub mod filesystem {
    tonic::include_proto!("filesystem");
}

/// The encoded `FileDescriptorSet` of every `.proto` file guestd serves.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptor.bin"));

/// [`FILE_DESCRIPTOR_SET`], decoded (a few milliseconds of work: callers decode it lazily).
pub fn descriptor_pool() -> prost_reflect::DescriptorPool {
    prost_reflect::DescriptorPool::decode(FILE_DESCRIPTOR_SET)
        .expect("the embedded descriptor set is valid: it was produced by the build script")
}
