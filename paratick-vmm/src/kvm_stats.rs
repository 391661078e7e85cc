//! KVM's exit statistics, typed: the counters that say where a VM's exits go. The
//! same names as KVM's binary stats file and its debugfs files (`kvm_stat -d`), so that
//! one type carries them from either source.

use serde::{Deserialize, Serialize};

/// Cumulative KVM exit statistics, of one vCPU or summed over vCPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvmExitCounts {
    /// Every exit from guest mode.
    pub exits: u64,
    /// Exits on HLT.
    pub halt_exits: u64,
    /// Exits for host interrupts (on PVM also the host timer's and an injection's).
    pub irq_exits: u64,
    /// Exits to open an interrupt window.
    pub irq_window_exits: u64,
    /// Exits for port I/O.
    pub io_exits: u64,
    /// Exits for MMIO.
    pub mmio_exits: u64,
    /// Exits for a signal to the vCPU thread (kicks).
    pub signal_exits: u64,
    /// Interrupts injected.
    pub irq_injections: u64,
    /// Instructions KVM emulated (guest CPL0 code on PVM).
    pub insn_emulation: u64,
    /// Wake-ups from halt.
    pub halt_wakeup: u64,
}

impl KvmExitCounts {
    /// KVM's names of the exit categories, with their fields: what `exits` breaks into.
    pub const CATEGORIES: [&'static str; 6] =
        ["halt_exits", "irq_exits", "irq_window_exits", "io_exits", "mmio_exits", "signal_exits"];

    /// Builds the counts from named values (a stats file, a debugfs directory); a name
    /// the kernel does not have counts 0.
    pub fn from_named(value: impl Fn(&str) -> Option<u64>) -> KvmExitCounts {
        let get = |name: &str| value(name).unwrap_or(0);
        KvmExitCounts {
            exits: get("exits"),
            halt_exits: get("halt_exits"),
            irq_exits: get("irq_exits"),
            irq_window_exits: get("irq_window_exits"),
            io_exits: get("io_exits"),
            mmio_exits: get("mmio_exits"),
            signal_exits: get("signal_exits"),
            irq_injections: get("irq_injections"),
            insn_emulation: get("insn_emulation"),
            halt_wakeup: get("halt_wakeup"),
        }
    }

    /// The category counts by KVM name, then `other_exits`: the rest of `exits`.
    pub fn by_category(&self) -> [(&'static str, u64); 7] {
        let named =
            [self.halt_exits, self.irq_exits, self.irq_window_exits, self.io_exits, self.mmio_exits, self.signal_exits];
        let other = self.exits.saturating_sub(named.iter().sum());
        let [a, b, c, d, e, f] = Self::CATEGORIES;
        [
            (a, named[0]),
            (b, named[1]),
            (c, named[2]),
            (d, named[3]),
            (e, named[4]),
            (f, named[5]),
            ("other_exits", other),
        ]
    }

    fn zip(self, other: KvmExitCounts, op: impl Fn(u64, u64) -> u64) -> KvmExitCounts {
        KvmExitCounts {
            exits: op(self.exits, other.exits),
            halt_exits: op(self.halt_exits, other.halt_exits),
            irq_exits: op(self.irq_exits, other.irq_exits),
            irq_window_exits: op(self.irq_window_exits, other.irq_window_exits),
            io_exits: op(self.io_exits, other.io_exits),
            mmio_exits: op(self.mmio_exits, other.mmio_exits),
            signal_exits: op(self.signal_exits, other.signal_exits),
            irq_injections: op(self.irq_injections, other.irq_injections),
            insn_emulation: op(self.insn_emulation, other.insn_emulation),
            halt_wakeup: op(self.halt_wakeup, other.halt_wakeup),
        }
    }

    /// Field-wise sum.
    pub fn plus(self, other: KvmExitCounts) -> KvmExitCounts {
        self.zip(other, u64::wrapping_add)
    }

    /// Field-wise difference since `earlier` (0 where a counter restarted).
    pub fn since(self, earlier: KvmExitCounts) -> KvmExitCounts {
        self.zip(earlier, u64::saturating_sub)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn categories_add_up_to_the_exits() {
        let counts = KvmExitCounts::from_named(|name| match name {
            "exits" => Some(100),
            "halt_exits" => Some(10),
            "io_exits" => Some(30),
            "irq_exits" => Some(20),
            _ => None,
        });
        let categories = counts.by_category();
        assert_eq!(categories.iter().map(|(_, n)| n).sum::<u64>(), 100);
        assert_eq!(categories[6], ("other_exits", 40));
        assert_eq!(counts.plus(counts).since(counts), counts);
        assert_eq!(KvmExitCounts::default().since(counts), KvmExitCounts::default());
    }
}
