pub mod config;
pub mod core;
pub mod notify;
pub mod sockets;
pub mod spawn;
