//! Decompression of compressed clusters ("Compressed Clusters Descriptor"
//! in the specification): raw deflate or a zstd frame.
//!
//! The stored length is rounded up to whole sectors, so the input may carry
//! trailing bytes after the stream: decoding stops once the cluster is full.
//! Decoders are kept per thread, since creating one costs more than
//! decompressing a cluster.

use std::cell::RefCell;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use qcow_format::header::CompressionType;

/// zstd level QEMU uses (the library's default).
const ZSTD_LEVEL: i32 = 3;

thread_local! {
    static DEFLATE: RefCell<Compress> =
        RefCell::new(Compress::new_with_window_bits(Compression::default(), false, 12));
    static ZSTD_COMPRESS: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
    static INFLATE: RefCell<Decompress> = RefCell::new(Decompress::new(false));
    static ZSTD: RefCell<Option<zstd::zstd_safe::DCtx<'static>>> = const { RefCell::new(None) };
}

/// Compresses one cluster as QEMU does: raw deflate with a 4 KiB window, or
/// one zstd frame. `None` when the result would not be smaller than the
/// input (the caller then stores the cluster uncompressed).
pub(crate) fn compress(kind: CompressionType, input: &[u8]) -> Option<Vec<u8>> {
    match kind {
        CompressionType::Zlib => DEFLATE.with(|cell| {
            let mut c = cell.borrow_mut();
            c.reset();
            // Room for the worst case (stored blocks): zlib's deflateBound.
            // zlib-rs panics instead of stopping when stored blocks do not
            // fit the output, so the output must never be short.
            let bound = input.len() + (input.len() >> 12) + (input.len() >> 14) + 64;
            let mut out = Vec::with_capacity(bound);
            match c.compress_vec(input, &mut out, FlushCompress::Finish) {
                Ok(Status::StreamEnd) => Some(out),
                _ => None,
            }
        }),
        CompressionType::Zstd => ZSTD_COMPRESS.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.is_none() {
                *slot = zstd::bulk::Compressor::new(ZSTD_LEVEL).ok();
            }
            let c = slot.as_mut()?;
            // Compressed into spare capacity: no zeroing of the buffer.
            let mut out = Vec::with_capacity(input.len());
            c.compress_to_buffer(input, &mut out).ok()?;
            Some(out)
        }),
    }
    .filter(|out| out.len() < input.len())
}

/// Decompresses `input` into all of `out`; fails unless `out` is filled.
pub(crate) fn decompress(
    kind: CompressionType,
    input: &[u8],
    out: &mut [u8],
) -> Result<(), String> {
    match kind {
        CompressionType::Zlib => inflate(input, out),
        CompressionType::Zstd => unzstd(input, out),
    }
}

/// Inflates raw deflate data (any window size up to 32 KiB).
pub(crate) fn inflate(input: &[u8], out: &mut [u8]) -> Result<(), String> {
    INFLATE.with(|cell| {
        let mut d = cell.borrow_mut();
        d.reset(false);
        match d.decompress(input, out, FlushDecompress::Finish) {
            Ok(Status::StreamEnd | Status::Ok | Status::BufError) => {}
            Err(e) => return Err(e.to_string()),
        }
        let produced = d.total_out();
        if produced == out.len() as u64 {
            Ok(())
        } else {
            Err(format!(
                "deflate stream ended after {produced} of {} bytes",
                out.len()
            ))
        }
    })
}

/// Decodes the one zstd frame at the start of `input` straight into `out`
/// (the bytes after the frame are sector padding).
fn unzstd(input: &[u8], out: &mut [u8]) -> Result<(), String> {
    use zstd::zstd_safe;
    let frame_len = zstd_safe::find_frame_compressed_size(input)
        .map_err(|code| format!("bad zstd frame: {}", zstd_safe::get_error_name(code)))?;
    let frame = input
        .get(..frame_len)
        .ok_or_else(|| "zstd frame is longer than its cluster".to_owned())?;
    ZSTD.with(|cell| {
        let mut slot = cell.borrow_mut();
        let dctx = slot.get_or_insert_with(zstd_safe::DCtx::create);
        let produced = dctx
            .decompress(out, frame)
            .map_err(|code| format!("zstd: {}", zstd_safe::get_error_name(code)))?;
        if produced == out.len() {
            Ok(())
        } else {
            Err(format!(
                "zstd frame holds {produced} bytes, not {}",
                out.len()
            ))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Compress, Compression, FlushCompress};

    #[test]
    fn inflates_raw_deflate_with_trailing_bytes() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        let mut c = Compress::new(Compression::default(), false);
        let mut packed = Vec::with_capacity(70000);
        c.compress_vec(&data, &mut packed, FlushCompress::Finish)
            .expect("compress");
        packed.extend_from_slice(&[0xAA; 300]);
        let mut out = vec![0u8; data.len()];
        inflate(&packed, &mut out).expect("inflate");
        assert_eq!(out, data);
        let mut too_big = vec![0u8; data.len() + 1];
        assert!(inflate(&packed[..packed.len() - 300], &mut too_big).is_err());
    }

    #[test]
    fn compress_round_trips_and_refuses_to_grow() {
        let text: Vec<u8> = (0..65536u32)
            .map(|i| b"qcow2 text "[i as usize % 11])
            .collect();
        for kind in [CompressionType::Zlib, CompressionType::Zstd] {
            let packed = compress(kind, &text).expect("text compresses");
            let mut out = vec![0u8; text.len()];
            decompress(kind, &packed, &mut out).expect("round trip");
            assert_eq!(out, text);
            let mut noise = vec![0u8; 65536];
            let mut x = 1u32;
            for b in &mut noise {
                x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                *b = (x >> 24) as u8;
            }
            assert!(compress(kind, &noise).is_none());
        }
    }

    #[test]
    fn mixed_and_incompressible_clusters_of_every_size_never_panic() {
        let mut x = 7u32;
        for bits in 9..=21 {
            let len = 1usize << bits;
            let mut data = vec![0u8; len];
            for (i, b) in data.iter_mut().enumerate() {
                x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                *b = if (i / 700) % 3 == 0 {
                    b"text"[i % 4]
                } else {
                    (x >> 24) as u8
                };
            }
            for kind in [CompressionType::Zlib, CompressionType::Zstd] {
                if let Some(packed) = compress(kind, &data) {
                    let mut out = vec![0u8; len];
                    decompress(kind, &packed, &mut out).expect("round trip");
                    assert_eq!(out, data);
                }
            }
        }
    }

    #[test]
    fn decodes_zstd_with_trailing_bytes() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 13) as u8).collect();
        let mut packed = zstd::bulk::compress(&data, 3).expect("compress");
        packed.extend_from_slice(&[0x55; 100]);
        let mut out = vec![0u8; data.len()];
        unzstd(&packed, &mut out).expect("zstd");
        assert_eq!(out, data);
        assert!(unzstd(&[1, 2, 3], &mut out).is_err());
    }
}
