//! Replication between sites: the replica's journal, state and apply
//! (docs/REPLICA.md), and the sessions that ship and receive a group's
//! changes over the peer protocol (docs/PEER.md).

#![allow(clippy::cast_possible_truncation)] // TODO(issue 8): being rewritten; fixed with the rewrite

mod error;
pub mod files;
pub mod journal;
pub mod receiver;
pub mod replica;
pub mod shipper;
pub mod state;
pub mod throttle;

pub use error::ReplicaError;
