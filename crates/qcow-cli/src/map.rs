//! `qcow map`: how each guest range is stored, in qemu-img map's shapes.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, bail};
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
    #[command(flatten)]
    open: OpenFlags,
    /// The image.
    file: PathBuf,
}

/// One merged run of the map.
#[derive(Debug, Clone, PartialEq, Eq)]
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

    /// Whether `next` continues this entry (same flags, contiguous offsets).
    fn extends_to(&self, next: &MapEntry) -> bool {
        self.start + self.length == next.start
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
                (Some(a), Some(b)) => a + self.length == b,
                (None, None) => true,
                _ => false,
            }
    }
}

/// Runs `qcow map`.
pub(crate) fn run(args: &MapArgs) -> Result<ExitCode> {
    let json = match args.output.as_str() {
        "json" => true,
        "human" => false,
        other => bail!("--output must be human or json, not {other:?}"),
    };
    let image = open_image(&args.file, args.format.as_deref(), &args.open, None, true)?;
    let entries = collect(&image)?;
    if json {
        let lines: Vec<String> = entries.iter().map(json_entry).collect();
        println!("[{}]", lines.join(",\n"));
        return Ok(ExitCode::SUCCESS);
    }
    let names = chain_names(&image);
    println!("{:<16}{:<16}{:<16}File", "Offset", "Length", "Mapped to");
    // Like qemu-img, list data that does not read as zeros.
    for e in entries.iter().filter(|e| e.data && !e.zero) {
        let Some(offset) = e.offset else {
            bail!("File contains external, encrypted or compressed clusters.");
        };
        let file = names.get(e.depth as usize).map_or("", String::as_str);
        println!(
            "{:<16}{:<16}{:<16}{}",
            hex(e.start),
            hex(e.length),
            hex(offset),
            file
        );
    }
    Ok(ExitCode::SUCCESS)
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

fn collect(image: &dyn BlockDevice) -> Result<Vec<MapEntry>> {
    let size = image.virtual_size();
    let mut entries: Vec<MapEntry> = Vec::new();
    let mut pos = 0;
    while pos < size {
        let extent = image.block_status(pos, size - pos)?;
        let len = extent.len.max(1);
        let entry = MapEntry::from_extent(pos, len, extent.allocation);
        match entries.last_mut() {
            Some(last) if last.extends_to(&entry) => last.length += len,
            _ => entries.push(entry),
        }
        pos += len;
    }
    Ok(entries)
}

fn json_entry(e: &MapEntry) -> String {
    let mut s = format!(
        "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
        e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
    );
    if let Some(offset) = e.offset {
        s.push_str(&format!(", \"offset\": {offset}"));
    }
    s.push('}');
    s
}
