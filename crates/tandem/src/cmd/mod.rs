pub mod agent;
pub mod dirty;
