//! Encrypted data in whole sectors: reading and writing any byte range of
//! an encrypted image's data through a [`DataCipher`], for qcow2 images,
//! qcow version 1 images and LUKS volumes alike. Sectors follow the
//! offset the IVs come from (the host offset for LUKS in qcow2, the guest
//! offset otherwise); a range that starts or ends inside a sector is read,
//! or merged, with the whole sectors around it.

use crate::{Error, Result};

use super::DataCipher;
use super::cipher::SECTOR;

/// Bytes encrypted at a time from a copy of a caller's whole sectors.
const ENCRYPT_PIECE: usize = 1 << 20;

/// Where whole sectors around a byte range start.
struct Around {
    /// Bytes of the first sector before the range.
    head: u64,
    /// Host offset of the first sector.
    host: u64,
    /// Guest offset of the first sector.
    guest: u64,
    /// Bytes of the whole sectors.
    len: usize,
}

impl DataCipher {
    /// The whole sectors around `len` bytes at `host` (guest `guest`) of
    /// image `name`.
    fn around(&self, name: &str, host: u64, guest: u64, len: usize) -> Result<Around> {
        let sector = SECTOR as u64;
        let head = if self.physical() { host } else { guest } % sector;
        let (Some(first_host), Some(first_guest)) =
            (host.checked_sub(head), guest.checked_sub(head))
        else {
            return Err(Error::Corrupt {
                image: name.into(),
                table: "L2 table",
                offset: host,
                reason: "encrypted data starts before the first sector".into(),
            });
        };
        Ok(Around {
            head,
            host: first_host,
            guest: first_guest,
            // The caller's range and at most two sectors more.
            len: (head + len as u64).next_multiple_of(sector) as usize,
        })
    }

    /// Reads `out` from host offset `host` (guest offset `guest`) of image
    /// `name`, decrypted: `read` reads the encrypted bytes at a host
    /// offset, whole sectors of them.
    pub(crate) fn read_sectors(
        &self,
        name: &str,
        out: &mut [u8],
        host: u64,
        guest: u64,
        mut read: impl FnMut(&mut [u8], u64) -> Result<()>,
    ) -> Result<()> {
        let around = self.around(name, host, guest, out.len())?;
        if around.head == 0 && around.len == out.len() {
            read(out, host)?;
            self.decrypt(host, guest, out);
            return Ok(());
        }
        let mut sectors = vec![0u8; around.len];
        read(&mut sectors, around.host)?;
        self.decrypt(around.host, around.guest, &mut sectors);
        let head = around.head as usize;
        out.copy_from_slice(&sectors[head..head + out.len()]);
        Ok(())
    }

    /// Writes `data` encrypted at host offset `host` (guest offset
    /// `guest`) of image `name`: `write` writes encrypted bytes at a host
    /// offset and `read` reads them. Whole sectors are encrypted from a
    /// copy, a megabyte at a time; a range that starts or ends inside a
    /// sector is merged into those sectors' decrypted contents, under the
    /// cipher's merge lock, so that two such writes into one sector do not
    /// undo each other.
    pub(crate) fn write_sectors(
        &self,
        name: &str,
        data: &[u8],
        host: u64,
        guest: u64,
        read: impl FnMut(&mut [u8], u64) -> Result<()>,
        mut write: impl FnMut(&[u8], u64) -> Result<()>,
    ) -> Result<()> {
        let around = self.around(name, host, guest, data.len())?;
        if around.head == 0 && around.len == data.len() {
            let mut copy = Vec::with_capacity(ENCRYPT_PIECE.min(data.len()));
            for (i, piece) in data.chunks(ENCRYPT_PIECE).enumerate() {
                let at = (i * ENCRYPT_PIECE) as u64;
                copy.clear();
                copy.extend_from_slice(piece);
                self.encrypt(host + at, guest + at, &mut copy);
                write(&copy, host + at)?;
            }
            return Ok(());
        }
        let _merging = self.merge_lock();
        let mut sectors = vec![0u8; around.len];
        self.read_sectors(name, &mut sectors, around.host, around.guest, read)?;
        let head = around.head as usize;
        sectors[head..head + data.len()].copy_from_slice(data);
        self.encrypt(around.host, around.guest, &mut sectors);
        write(&sectors, around.host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// An encrypted "file" of `len` bytes starting `shift` bytes before
    /// guest offset 0's sector, written through `write_sectors` and read
    /// back through `read_sectors`, against plain bytes.
    fn round_trip(cipher: &DataCipher, shift: u64) {
        let len = 8 * SECTOR;
        let file = RefCell::new(vec![0u8; len + shift as usize]);
        let mut plain = vec![0u8; len];
        // Start from every sector encrypted zeros.
        let zeros = vec![0u8; len];
        let read = |buf: &mut [u8], at: u64| {
            buf.copy_from_slice(&file.borrow()[at as usize..at as usize + buf.len()]);
            Ok(())
        };
        let write = |buf: &[u8], at: u64| {
            file.borrow_mut()[at as usize..at as usize + buf.len()].copy_from_slice(buf);
            Ok(())
        };
        cipher
            .write_sectors("test", &zeros, shift, 0, read, write)
            .expect("zeros");
        for (i, (at, n)) in [
            (0usize, 512usize),
            (100, 7),
            (510, 4),
            (1000, 2000),
            (3584, 512),
        ]
        .into_iter()
        .enumerate()
        {
            let bytes: Vec<u8> = (0..n).map(|b| (b * 7 + i + 1) as u8).collect();
            plain[at..at + n].copy_from_slice(&bytes);
            cipher
                .write_sectors("test", &bytes, shift + at as u64, at as u64, read, write)
                .expect("write");
            let mut whole = vec![0u8; len];
            cipher
                .read_sectors("test", &mut whole, shift, 0, read)
                .expect("read whole");
            assert!(whole == plain, "after writing {n} bytes at {at}");
            let mut piece = vec![0u8; n + 3];
            let from = at.saturating_sub(1).min(len - piece.len());
            cipher
                .read_sectors("test", &mut piece, shift + from as u64, from as u64, read)
                .expect("read piece");
            assert!(piece == plain[from..from + piece.len()], "piece at {from}");
        }
        // The file holds no plain bytes of the last write's sector.
        assert!(file.borrow()[shift as usize + 3584..][..512] != plain[3584..4096]);
    }

    #[test]
    fn partial_sectors_merge_into_their_neighbours_bytes() {
        round_trip(&DataCipher::legacy_aes(b"secret").expect("aes"), 0);
        // Guest IVs: the host copy may sit anywhere.
        round_trip(&DataCipher::legacy_aes(b"secret").expect("aes"), 4096);
    }

    #[test]
    fn a_range_before_the_first_sector_is_refused() {
        let cipher = DataCipher::legacy_aes(b"secret").expect("aes");
        let mut out = [0u8; 4];
        let error = cipher
            .read_sectors("disk", &mut out, 10, 100, |_, _| Ok(()))
            .expect_err("host 10 cannot hold guest 100's sector");
        assert!(error.to_string().contains("disk"), "{error}");
    }
}
