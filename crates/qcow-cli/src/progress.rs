//! `-p`: progress of a copy. On a terminal, a bar with the fraction done
//! to two decimals; elsewhere qemu-img's own lines on standard output
//! (`    (12.34/100%)` each ended by a carriage return, a newline at the
//! end), so that scripts and log parsers written for qemu-img keep working.

use std::io::{IsTerminal, Write};
use std::sync::{Mutex, PoisonError};

use qcow::copy::CopyObserver;

/// Progress over `total` bytes.
pub(crate) enum Progress {
    /// A terminal's bar.
    Bar(indicatif::ProgressBar),
    /// qemu-img's lines.
    Lines(Lines),
}

/// qemu-img's progress lines: a line when the percentage has moved more
/// than `min_skip` points from the last one printed (either way: a job
/// may find more work and go back), or is 0 or 100. Single precision, as
/// qemu-img counts.
pub(crate) struct Lines {
    min_skip: f32,
    last: Mutex<f32>,
}

impl Progress {
    /// Progress at 0 of `total` bytes (the bar's length until the job
    /// says its own total), printing lines `min_skip` percent points apart
    /// (qemu-img uses 1 for convert, commit and amend, 2 for compare and
    /// rebase).
    pub(crate) fn new(total: u64, min_skip: f32) -> Self {
        if std::io::stdout().is_terminal() {
            let bar = indicatif::ProgressBar::new(total);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "    ({msg}/100%) [{bar:40}] {bytes}/{total_bytes}",
            ) {
                bar.set_style(style);
            }
            bar.set_message("0.00");
            Progress::Bar(bar)
        } else {
            print_line(0.0);
            Progress::Lines(Lines {
                min_skip,
                last: Mutex::new(0.0),
            })
        }
    }

    /// Shows 100% (once more, as qemu-img does after its job) and ends the
    /// output.
    pub(crate) fn finish(self) {
        match &self {
            Progress::Bar(bar) => bar.set_message("100.00"),
            Progress::Lines(lines) => {
                *lines.last.lock().unwrap_or_else(PoisonError::into_inner) = 100.0;
                print_line(100.0);
            }
        }
        self.close();
    }

    /// Shows 100%, leaving the line open (qemu-img's compare prints its
    /// verdict there, then ends the progress output).
    pub(crate) fn complete(&self) {
        match self {
            Progress::Bar(bar) => bar.set_message("100.00"),
            Progress::Lines(lines) => {
                let mut last = lines.last.lock().unwrap_or_else(PoisonError::into_inner);
                if *last < 100.0 {
                    *last = 100.0;
                    print_line(100.0);
                }
            }
        }
    }

    /// Ends the progress output.
    pub(crate) fn close(self) {
        match self {
            Progress::Bar(bar) => bar.finish(),
            Progress::Lines(_) => println!(),
        }
    }
}

fn percent(done: u64, total: u64) -> f32 {
    if total == 0 {
        100.0
    } else {
        (done as f64 * 100.0 / total as f64).min(100.0) as f32
    }
}

fn print_line(percent: f32) {
    let mut out = std::io::stdout().lock();
    // Progress output that cannot be written is no reason to fail a copy.
    let _ = write!(out, "    ({percent:.2}/100%)\r");
    let _ = out.flush();
}

impl CopyObserver for Progress {
    /// `done` of the observed job's `total`.
    fn progress(&self, done: u64, total: u64) {
        match self {
            Progress::Bar(bar) => {
                bar.set_length(total);
                bar.set_position(done);
                bar.set_message(format!("{:.2}", percent(done, total)));
            }
            Progress::Lines(lines) => {
                let now = percent(done, total);
                let mut last = lines.last.lock().unwrap_or_else(PoisonError::into_inner);
                if (now - *last).abs() > lines.min_skip || now >= 100.0 || now == 0.0 {
                    *last = now;
                    print_line(now);
                }
            }
        }
    }
}
