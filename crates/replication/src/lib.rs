//! Replication between sites: the replica's journal, state and apply
//! (docs/REPLICA.md), and the sessions that ship and receive a group's
//! changes over the peer protocol (docs/PEER.md).

#![forbid(unsafe_code)]

pub mod diverged;
mod error;
pub mod files;
pub mod history;
pub mod journal;
pub mod link;
pub mod owners;
pub mod receiver;
pub mod replica;
pub mod runtime;
pub mod session;
pub mod shipper;
mod squeeze;
pub mod state;
pub mod throttle;

pub use error::ReplicaError;
