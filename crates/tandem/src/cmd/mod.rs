pub mod agent;
pub mod certs;
pub mod dirty;
pub mod status;
