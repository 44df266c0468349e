//! The peer protocol's rules as machines over decoded messages, without
//! I/O (docs/PEER.md, "Sessions"): [`replica::ReplicaSession`] on the
//! replica's side, [`shipper::ShipperSession`] on the primary's, and
//! [`marks::Marker`], which records the primary marks as recovery points. The
//! receiver and the shipper drive them over sockets, the journal and the
//! images; property tests drive them over random interleavings.

pub mod marks;
pub mod replica;
pub mod shipper;

/// (epoch, sequence number) of a record: where a history stands.
pub type Tip = (u64, u64);
