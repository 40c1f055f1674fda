//! The simulated network: QUIC over turmoil's UDP, HTTP over turmoil's TCP.

pub mod tcp;
pub mod udp;
