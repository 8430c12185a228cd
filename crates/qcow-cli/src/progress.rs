//! `-p`: a progress bar fed by the library's copy engine.

use qcow::copy::CopyObserver;

/// A progress bar over a copy of `total` bytes.
pub(crate) struct Progress(indicatif::ProgressBar);

impl Progress {
    /// A bar at 0 of `total` bytes.
    pub(crate) fn new(total: u64) -> Self {
        let bar = indicatif::ProgressBar::new(total);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "    ({percent:>3}.00/100%) [{bar:40}] {bytes}/{total_bytes}",
        ) {
            bar.set_style(style);
        }
        Progress(bar)
    }

    /// Shows the bar full and leaves it.
    pub(crate) fn finish(self) {
        self.0.finish();
    }
}

impl CopyObserver for Progress {
    fn progress(&self, done: u64, _total: u64) {
        self.0.set_position(done);
    }
}
