//! The failover logic (filled in next).
