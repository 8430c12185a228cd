//! The hashes LUKS names: PBKDF2 over HMAC of them, and their digests for
//! the anti-forensic splitter and ESSIV.

use sha1::Sha1;
use sha2::{Digest, Sha224, Sha256, Sha384, Sha512};

use super::CryptoError;

/// A hash LUKS may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashAlg {
    /// SHA-1.
    Sha1,
    /// SHA-224.
    Sha224,
    /// SHA-256.
    Sha256,
    /// SHA-384.
    Sha384,
    /// SHA-512.
    Sha512,
}

impl HashAlg {
    /// The hash LUKS names `name`.
    pub fn from_name(name: &str) -> Result<HashAlg, CryptoError> {
        Ok(match name {
            "sha1" => HashAlg::Sha1,
            "sha224" => HashAlg::Sha224,
            "sha256" => HashAlg::Sha256,
            "sha384" => HashAlg::Sha384,
            "sha512" => HashAlg::Sha512,
            _ => {
                return Err(CryptoError::NotSupported {
                    what: "Hash",
                    name: name.to_owned(),
                });
            }
        })
    }

    /// The name LUKS and QEMU give it.
    pub fn name(self) -> &'static str {
        match self {
            HashAlg::Sha1 => "sha1",
            HashAlg::Sha224 => "sha224",
            HashAlg::Sha256 => "sha256",
            HashAlg::Sha384 => "sha384",
            HashAlg::Sha512 => "sha512",
        }
    }

    /// Bytes of a digest.
    pub fn digest_len(self) -> usize {
        match self {
            HashAlg::Sha1 => 20,
            HashAlg::Sha224 => 28,
            HashAlg::Sha256 => 32,
            HashAlg::Sha384 => 48,
            HashAlg::Sha512 => 64,
        }
    }

    /// The digest of the concatenated `parts`.
    pub fn digest(self, parts: &[&[u8]]) -> Vec<u8> {
        fn run<D: Digest>(parts: &[&[u8]]) -> Vec<u8> {
            let mut hasher = D::new();
            for part in parts {
                hasher.update(part);
            }
            hasher.finalize().to_vec()
        }
        match self {
            HashAlg::Sha1 => run::<Sha1>(parts),
            HashAlg::Sha224 => run::<Sha224>(parts),
            HashAlg::Sha256 => run::<Sha256>(parts),
            HashAlg::Sha384 => run::<Sha384>(parts),
            HashAlg::Sha512 => run::<Sha512>(parts),
        }
    }

    /// PBKDF2 with HMAC over this hash: fills `out`.
    pub fn pbkdf2(self, password: &[u8], salt: &[u8], iterations: u32, out: &mut [u8]) {
        use pbkdf2::pbkdf2_hmac;
        match self {
            HashAlg::Sha1 => pbkdf2_hmac::<Sha1>(password, salt, iterations, out),
            HashAlg::Sha224 => pbkdf2_hmac::<Sha224>(password, salt, iterations, out),
            HashAlg::Sha256 => pbkdf2_hmac::<Sha256>(password, salt, iterations, out),
            HashAlg::Sha384 => pbkdf2_hmac::<Sha384>(password, salt, iterations, out),
            HashAlg::Sha512 => pbkdf2_hmac::<Sha512>(password, salt, iterations, out),
        }
    }
}

impl HashAlg {
    /// PBKDF2 iterations this machine runs in a second for a password of
    /// `password_len` bytes and `out_len` bytes of output, measured over
    /// at least 100 ms (QEMU measures before it picks a key slot's
    /// iterations from `iter-time`).
    pub fn iterations_per_second(self, password_len: usize, out_len: usize) -> u64 {
        let password = vec![0x5au8; password_len];
        let salt = [0xa5u8; 32];
        let mut out = vec![0u8; out_len];
        let mut iterations = 1u32 << 10;
        loop {
            let started = std::time::Instant::now();
            self.pbkdf2(&password, &salt, iterations, &mut out);
            let elapsed = started.elapsed();
            if elapsed >= std::time::Duration::from_millis(100) || iterations >= 1 << 30 {
                let nanos = elapsed.as_nanos().max(1);
                return (u128::from(iterations) * 1_000_000_000 / nanos) as u64;
            }
            iterations *= 2;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pbkdf2_matches_rfc_6070() {
        let mut out = [0u8; 20];
        HashAlg::Sha1.pbkdf2(b"password", b"salt", 2, &mut out);
        assert_eq!(
            out,
            [
                0xea, 0x6c, 0x01, 0x4d, 0xc7, 0x2d, 0x6f, 0x8c, 0xcd, 0x1e, 0xd9, 0x2a, 0xce, 0x1d,
                0x41, 0xf0, 0xd8, 0xde, 0x89, 0x57
            ]
        );
    }

    #[test]
    fn unknown_hashes_are_named() {
        let e = HashAlg::from_name("md5").unwrap_err();
        assert_eq!(e.to_string(), "Hash 'md5' not supported");
    }
}
