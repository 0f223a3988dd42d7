pub mod config;
pub mod control;
pub mod core;
pub mod daemon;
pub mod notify;
pub mod sockets;
pub mod spawn;
