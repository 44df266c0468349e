pub mod link;
pub mod replica;
