//! `qcow map`: how each guest range is stored, in qemu-img map's shapes.
//!
//! The map is streamed: each run is merged with the runs that continue it
//! as they are found and printed as soon as the next one does not, so
//! memory stays the same whatever the image holds (a crafted image can
//! describe billions of runs).

use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use qcow::{Allocation, BlockDevice};

use crate::open::{OpenFlags, open_image};

/// Arguments of `qcow map`.
#[derive(Debug, clap::Args)]
pub(crate) struct MapArgs {
    /// Output format.
    #[arg(long, value_name = "human|json", default_value = "human")]
    output: String,
    /// Image format (probed when omitted).
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// Map from this guest offset.
    #[arg(
        long = "start-offset",
        value_name = "OFFSET",
        allow_hyphen_values = true
    )]
    start_offset: Option<String>,
    /// Map at most this many bytes.
    #[arg(long = "max-length", value_name = "LENGTH", allow_hyphen_values = true)]
    max_length: Option<String>,
    #[command(flatten)]
    open: OpenFlags,
    /// The image.
    file: PathBuf,
}

/// One merged run of the map.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct MapEntry {
    start: u64,
    length: u64,
    depth: u32,
    present: bool,
    zero: bool,
    data: bool,
    compressed: bool,
    offset: Option<u64>,
}

impl MapEntry {
    fn from_extent(start: u64, length: u64, allocation: Allocation) -> Self {
        let (depth, present, zero, data, compressed, offset) = match allocation {
            Allocation::Data {
                depth,
                offset,
                compressed,
                zero,
            } => (depth, true, zero, true, compressed, offset),
            Allocation::Zero { depth, offset } => (depth, true, true, false, false, offset),
            Allocation::Unallocated { depth, offset } => (depth, false, true, false, false, offset),
            Allocation::Unknown { depth } => (depth, false, false, false, false, None),
        };
        MapEntry {
            start,
            length,
            depth,
            present,
            zero,
            data,
            compressed,
            offset,
        }
    }

    /// Whether `next`, which starts where this entry ends, continues it
    /// (same flags and layer, contiguous host offsets). An empty entry
    /// (the start of the walk) continues nothing.
    fn extends_to(&self, next: &MapEntry) -> bool {
        self.length > 0
            && (
                self.depth,
                self.present,
                self.zero,
                self.data,
                self.compressed,
            ) == (
                next.depth,
                next.present,
                next.zero,
                next.data,
                next.compressed,
            )
            && match (self.offset, next.offset) {
                (Some(a), Some(b)) => a.checked_add(self.length) == Some(b),
                (None, None) => true,
                _ => false,
            }
    }
}

/// Where finished entries go, in one of qemu-img map's two shapes.
struct Printer<W: Write> {
    out: W,
    json: bool,
    /// File names of the chain's layers, by depth (human output).
    names: Vec<String>,
}

impl<W: Write> Printer<W> {
    fn start(&mut self) -> Result<()> {
        if self.json {
            write!(self.out, "[")?;
        } else {
            writeln!(
                self.out,
                "{:<16}{:<16}{:<16}File",
                "Offset", "Length", "Mapped to"
            )?;
        }
        Ok(())
    }

    /// Prints `e`, followed by `next` when there is one (which human
    /// output may then merge more freely).
    fn entry(&mut self, e: &MapEntry, next: Option<&mut MapEntry>) -> Result<()> {
        if self.json {
            write!(
                self.out,
                "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
                e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
            )?;
            if let Some(offset) = e.offset {
                write!(self.out, ", \"offset\": {offset}")?;
            }
            write!(self.out, "}}")?;
            if next.is_some() {
                writeln!(self.out, ",")?;
            }
            return Ok(());
        }
        if e.data && e.offset.is_none() {
            bail!("File contains external, encrypted or compressed clusters.");
        }
        // Like qemu-img, list data that does not read as zeros.
        if e.data && !e.zero {
            let file = self.names.get(e.depth as usize).map_or("", String::as_str);
            writeln!(
                self.out,
                "{:<16}{:<16}{:<16}{}",
                hex(e.start),
                hex(e.length),
                hex(e.offset.unwrap_or(0)),
                file
            )?;
        }
        // This listing does not tell unallocated, zero and zero data
        // apart: make them one kind so that they merge.
        if let Some(next) = next {
            if !next.data || next.zero {
                next.data = false;
                next.zero = true;
            }
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        if self.json {
            writeln!(self.out, "]")?;
        }
        self.out.flush()?;
        Ok(())
    }
}

/// Runs `qcow map`.
pub(crate) fn run(args: &MapArgs) -> Result<ExitCode> {
    let json = match args.output.as_str() {
        "json" => true,
        "human" => false,
        other => bail!("--output must be human or json, not {other:?}"),
    };
    let start = match &args.start_offset {
        Some(text) => crate::size::cvtnum("start offset", text)?,
        None => 0,
    };
    let max_length = match &args.max_length {
        Some(text) => Some(crate::size::cvtnum("max length", text)?),
        None => None,
    };
    let image = open_image(
        &args.file,
        args.format.as_deref(),
        &args.open,
        None,
        true,
        false,
    )?;
    let size = image.virtual_size();
    let end = max_length.map_or(size, |n| start.saturating_add(n).min(size));
    let mut printer = Printer {
        out: BufWriter::new(std::io::stdout().lock()),
        json,
        names: chain_names(&image),
    };
    let result = walk(&image, &mut printer, start, end);
    // What was printed before a failure stays printed, as with qemu-img.
    let flushed = printer.out.flush().context("writing the map");
    result?;
    flushed?;
    Ok(ExitCode::SUCCESS)
}

/// Walks the image from start to end, printing each merged entry as soon
/// as it is complete: memory does not grow with the number of entries.
fn walk<W: Write>(
    image: &dyn BlockDevice,
    printer: &mut Printer<W>,
    start: u64,
    size: u64,
) -> Result<()> {
    printer.start()?;
    let mut curr = MapEntry {
        start,
        ..MapEntry::default()
    };
    while curr.start + curr.length < size {
        let pos = curr.start + curr.length;
        let extent = image.block_status(pos, size - pos)?;
        let len = extent.len.clamp(1, size - pos);
        let mut next = MapEntry::from_extent(pos, len, extent.allocation);
        if curr.extends_to(&next) {
            curr.length += len;
            continue;
        }
        if curr.length > 0 {
            printer.entry(&curr, Some(&mut next))?;
        }
        curr = next;
    }
    // As qemu-img, an empty image still prints its one empty entry.
    printer.entry(&curr, None)?;
    printer.finish()
}

/// C's `%#x`: zero prints as "0".
fn hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}

fn chain_names(image: &dyn BlockDevice) -> Vec<String> {
    let mut names = Vec::new();
    let mut layer = Some(image);
    while let Some(l) = layer {
        names.push(l.data_name().to_owned());
        layer = l.backing();
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(start: u64, length: u64, allocation: Allocation) -> MapEntry {
        MapEntry::from_extent(start, length, allocation)
    }

    fn data(offset: u64) -> Allocation {
        Allocation::Data {
            depth: 0,
            offset: Some(offset),
            compressed: false,
            zero: false,
        }
    }

    #[test]
    fn contiguous_data_merges_and_a_jump_does_not() {
        let a = entry(0, 512, data(4096));
        assert!(a.extends_to(&entry(512, 512, data(4608))));
        assert!(!a.extends_to(&entry(512, 512, data(8192))));
        assert!(!MapEntry::default().extends_to(&a));
    }

    #[test]
    fn json_entries_are_separated_by_a_comma_and_newline() {
        let mut out = Vec::new();
        let mut p = Printer {
            out: &mut out,
            json: true,
            names: vec![],
        };
        p.start().unwrap();
        let mut second = entry(
            512,
            512,
            Allocation::Zero {
                depth: 0,
                offset: None,
            },
        );
        p.entry(&entry(0, 512, data(4096)), Some(&mut second))
            .unwrap();
        p.entry(&second, None).unwrap();
        p.finish().unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "[{ \"start\": 0, \"length\": 512, \"depth\": 0, \"present\": true, \"zero\": false, \"data\": true, \"compressed\": false, \"offset\": 4096},\n\
             { \"start\": 512, \"length\": 512, \"depth\": 0, \"present\": true, \"zero\": true, \"data\": false, \"compressed\": false}]\n"
        );
    }
}
