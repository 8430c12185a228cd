//! The snapshot table's part of `check`, as QEMU's
//! `qcow2_check_read_snapshot_table` and `qcow2_check_fix_snapshot_table`
//! do it. The table is read before the refcounts are checked (an image
//! opened for a check has not read it): more than
//! [`MAX_SNAPSHOTS`] entries, entries past the table's size limit and
//! extra data past its limit are dropped under `-r all` (the header's count
//! is lowered at once; what the dropped entries used leaks, and the
//! refcount repair frees it), and otherwise stop the check. Version 3
//! entries without the VM state and disk size are corruptions. Once the
//! refcounts are repaired, the table is written anew with every entry
//! whole.

use qcow_format::header::field;
use qcow_format::limits::MAX_SNAPSHOTS;

use super::Qcow2Image;
use super::check::{CheckReport, Repair};
use crate::{Error, Result};

/// Bytes of extra data a version 3 entry needs: the VM state size and the
/// disk size.
const V3_EXTRA_DATA: usize = 16;

impl Qcow2Image {
    /// Reads the snapshot table for a check, reporting into `report` and
    /// `log`. Returns how many corruptions only a rewrite of the table
    /// repairs. An error means the check cannot go on.
    pub(super) fn check_read_snapshot_table(
        &mut self,
        repair: Repair,
        log: &mut dyn FnMut(&str),
        report: &mut CheckReport,
    ) -> Result<u64> {
        let fix = repair == Repair::All;
        let mut count = self.header.nb_snapshots;
        let offset = self.header.snapshots_offset;
        let mut reduced = 0u64;
        if count > MAX_SNAPSHOTS && fix {
            log(&format!(
                "Discarding {} overhanging snapshots",
                count - MAX_SNAPSHOTS
            ));
            reduced += u64::from(count - MAX_SNAPSHOTS);
            count = MAX_SNAPSHOTS;
        }
        self.snapshots = Vec::new();
        self.snapshot_table_bytes = 0;
        if count > MAX_SNAPSHOTS {
            log("ERROR snapshot table too large");
            log(&format!(
                "You can force-remove all {} overhanging snapshots with qemu-img check -r all",
                count - MAX_SNAPSHOTS
            ));
            report.check_errors += 1;
            return Err(Error::format(
                &self.name,
                qcow_format::FormatError::TooManySnapshots {
                    count,
                    limit: MAX_SNAPSHOTS,
                },
            ));
        }
        let cluster_size = self.header.cluster_size();
        let end = offset.checked_add(u64::from(count) * 40);
        if offset % cluster_size != 0 || end.is_none_or(|e| e > i64::MAX as u64) {
            log("ERROR snapshot table offset invalid");
            report.check_errors += 1;
            return Err(self.snapshot_table_unreadable(format!("offset {offset:#x} is invalid")));
        }
        let mut announce = |line: &str| log(line);
        let table = match self.read_snapshot_table(
            offset,
            count,
            fix.then_some(&mut announce as &mut dyn FnMut(&str)),
        ) {
            Ok(table) => table,
            Err(e) => {
                log(&format!(
                    "ERROR failed to read the snapshot table: {}",
                    qemu_text(&e)
                ));
                report.check_errors += 1;
                return Err(e);
            }
        };
        reduced += u64::from(table.overhanging);
        let kept = count - table.overhanging;
        self.snapshots = table.snapshots;
        self.snapshot_table_bytes = table.bytes;
        let mut pending = table.extra_data_dropped;
        if reduced > 0 {
            // Before the refcounts are checked: they must see the table the
            // header names. What the dropped entries used leaks until the
            // refcount repair frees it.
            let at = field::NB_SNAPSHOTS;
            let written = self
                .file
                .write_at(&kept.to_be_bytes(), at)
                .and_then(|()| self.file.flush())
                .map_err(|e| Error::io(&self.name, "writing the header", at, e));
            if let Err(e) = written {
                log(&format!(
                    "ERROR failed to update the snapshot count in the image header: {e}"
                ));
                report.check_errors += 1;
                return Err(e);
            }
            self.header.nb_snapshots = kept;
            report.corruptions_fixed += reduced;
        }
        if self.header.version >= 3 {
            let verb = if fix { "Repairing" } else { "ERROR" };
            for (i, snapshot) in self.snapshots.iter().enumerate() {
                if snapshot.extra_data.len() < V3_EXTRA_DATA {
                    log(&format!("{verb} snapshot table entry {i} is incomplete"));
                    pending += 1;
                }
            }
        }
        Ok(pending)
    }

    /// Writes the snapshot table anew when the check found corruptions
    /// only that repairs (QEMU's `qcow2_check_fix_snapshot_table`), once
    /// the refcounts are consistent.
    pub(super) fn check_fix_snapshot_table(
        &mut self,
        pending: u64,
        repair: Repair,
        log: &mut dyn FnMut(&str),
        report: &mut CheckReport,
    ) -> Result<()> {
        if pending == 0 {
            return Ok(());
        }
        if repair != Repair::All {
            report.corruptions += pending;
            return Ok(());
        }
        let installed = self.writer.is_none();
        let mut written = Ok(());
        if installed {
            written = self.install_write_state(None);
        }
        let snapshots = self.snapshots.clone();
        let written = written.and_then(|()| self.write_snapshot_table(snapshots));
        if installed {
            self.writer = None;
        }
        if let Err(e) = written {
            log(&format!("ERROR failed to update snapshot table: {e}"));
            report.check_errors += 1;
            report.corruptions += pending;
            return Err(e);
        }
        report.corruptions_fixed += pending;
        Ok(())
    }

    fn snapshot_table_unreadable(&self, reason: String) -> Error {
        Error::Corrupt {
            image: self.name.clone(),
            table: "snapshot table",
            offset: self.header.snapshots_offset,
            reason,
        }
    }
}

/// An error in QEMU's words where it has some, else in this crate's (the
/// check's report reads as qemu-img's).
fn qemu_text(error: &Error) -> String {
    match error {
        Error::Format { source, .. } => source.qemu_words().unwrap_or_else(|| source.to_string()),
        other => other.to_string(),
    }
}
