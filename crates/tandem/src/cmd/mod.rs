pub mod agent;
pub mod bandwidth;
pub mod certs;
pub mod dirty;
pub mod failover;
pub mod status;
pub mod verify;
pub mod witness;
