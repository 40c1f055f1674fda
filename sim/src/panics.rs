//! Counting panics. The node runs its work in tasks, and the runtime turns a task's panic into
//! an error for whoever awaits it, or into nothing; the checker must still see every one.

use std::sync::Mutex;
use std::sync::Once;

/// Most panic messages kept per process.
const PANICS_KEPT_MAX: usize = 1000;

static INSTALL: Once = Once::new();
/// Panics seen so far, and the first messages.
static PANICS: Mutex<(usize, Vec<String>)> = Mutex::new((0, Vec::new()));

/// Installs a panic hook (once per process) that records every panic, then runs the hook that
/// was there before.
pub fn install() {
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let message = format!("{:>9.3}s {info}", crate::now().as_secs_f64());
            let mut panics = PANICS.lock().unwrap_or_else(|p| p.into_inner());
            panics.0 += 1;
            if panics.1.len() < PANICS_KEPT_MAX {
                panics.1.push(message);
            }
            drop(panics);
            previous(info);
        }));
    });
}

/// Panics recorded so far (a position to pass to [`since`]).
pub fn count() -> usize {
    PANICS.lock().unwrap_or_else(|p| p.into_inner()).0
}

/// Panics recorded after position `from` (their messages, as far as kept).
pub fn since(from: usize) -> Vec<String> {
    let panics = PANICS.lock().unwrap_or_else(|p| p.into_inner());
    let mut out: Vec<String> = panics.1.iter().skip(from).cloned().collect();
    let missing = panics.0.saturating_sub(from).saturating_sub(out.len());
    if missing > 0 {
        out.push(format!("… and {missing} more"));
    }
    out
}
