//! TLS randomness from the seed.
//!
//! rustls draws the handshake's random values (client and server randoms, session ids) from its
//! crypto provider's `secure_random`, and *ring*'s key exchange draws ephemeral keys from the
//! operating system. Either way the bytes on the wire differ from run to run. Their sizes do
//! not, which was thought to be enough; it is not under loss and reordering: a late Initial
//! packet that reaches a node which has already dropped its connection is read as a new
//! connection attempt with the wrong keys, and whether the garbage its header then holds
//! passes the first check (and the node goes on to fail the handshake, creating and closing a
//! connection, which draws from the seeded RNGs and sends packets) or is dropped at once
//! depends on those random bytes. Runs of one seed then diverged (`chaos`,
//! `create-race-partition`, `ttl-revive-partition`, about one seed in three).
//!
//! So each node start gets a provider that is *ring*'s own but for its randomness: a seeded
//! `secure_random`, and X25519 key exchange whose ephemeral keys come from the same seed.

use std::sync::{Arc, Mutex};

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use ring::agreement;
use rustls::crypto::{
    ActiveKeyExchange, CryptoProvider, GetRandomFailed, SecureRandom, SharedSecret,
    SupportedKxGroup,
};
use rustls::{Error, NamedGroup, PeerMisbehaved};

/// *ring*'s provider, with randomness from `seed`.
pub fn seeded_provider(seed: u64) -> Arc<CryptoProvider> {
    let rng = Arc::new(Mutex::new(StdRng::seed_from_u64(
        seed ^ u64::from_le_bytes(*b"tls-rand"),
    )));
    // The provider holds `'static` references: one small allocation per node start, kept for
    // the process.
    let random: &'static SeededRandom = Box::leak(Box::new(SeededRandom(Arc::clone(&rng))));
    let x25519: &'static SeededX25519 = Box::leak(Box::new(SeededX25519(rng)));
    Arc::new(CryptoProvider {
        kx_groups: vec![x25519],
        secure_random: random,
        ..rustls::crypto::ring::default_provider()
    })
}

/// rustls's random values, from the seed.
#[derive(Debug)]
struct SeededRandom(Arc<Mutex<StdRng>>);

impl SecureRandom for SeededRandom {
    fn fill(&self, buf: &mut [u8]) -> Result<(), GetRandomFailed> {
        crate::lock(&self.0).fill_bytes(buf);
        Ok(())
    }
}

/// X25519 key exchange with ephemeral keys from the seed.
#[derive(Debug)]
struct SeededX25519(Arc<Mutex<StdRng>>);

impl SupportedKxGroup for SeededX25519 {
    fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, Error> {
        let mut secret = [0u8; 32];
        crate::lock(&self.0).fill_bytes(&mut secret);
        // *ring* takes randomness only from its own sealed sources; its fixed-bytes source (an
        // internal API, kept by the pinned version) hands it the seeded key.
        #[allow(deprecated)]
        let fixed = ring::test::rand::FixedSliceRandom { bytes: &secret };
        let private = agreement::EphemeralPrivateKey::generate(&agreement::X25519, &fixed)
            .map_err(|_| GetRandomFailed)?;
        let public = private.compute_public_key().map_err(|_| GetRandomFailed)?;
        Ok(Box::new(X25519Exchange {
            private,
            public: public.as_ref().to_vec(),
        }))
    }

    fn name(&self) -> NamedGroup {
        NamedGroup::X25519
    }
}

/// One key exchange under way.
struct X25519Exchange {
    private: agreement::EphemeralPrivateKey,
    public: Vec<u8>,
}

impl ActiveKeyExchange for X25519Exchange {
    fn complete(self: Box<Self>, peer: &[u8]) -> Result<SharedSecret, Error> {
        if peer.len() != 32 {
            return Err(PeerMisbehaved::InvalidKeyShare.into());
        }
        let peer = agreement::UnparsedPublicKey::new(&agreement::X25519, peer);
        agreement::agree_ephemeral(self.private, &peer, |secret| SharedSecret::from(secret))
            .map_err(|_| PeerMisbehaved::InvalidKeyShare.into())
    }

    fn pub_key(&self) -> &[u8] {
        &self.public
    }

    fn group(&self) -> NamedGroup {
        NamedGroup::X25519
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_exchanges_agree_and_replay() {
        let a = SeededX25519(Arc::new(Mutex::new(StdRng::seed_from_u64(1))));
        let b = SeededX25519(Arc::new(Mutex::new(StdRng::seed_from_u64(2))));
        let (ka, kb) = (a.start().expect("a"), b.start().expect("b"));
        let pa = ka.pub_key().to_vec();
        let pb = kb.pub_key().to_vec();
        let again = SeededX25519(Arc::new(Mutex::new(StdRng::seed_from_u64(1))));
        assert_eq!(again.start().expect("again").pub_key(), pa.as_slice());
        let sa = ka.complete(&pb).expect("a completes");
        let sb = kb.complete(&pa).expect("b completes");
        assert_eq!(sa.secret_bytes(), sb.secret_bytes());
    }
}
