//! Key layout (filled in with the failover logic).
