//! Which KVM backend this host runs, because it decides which tracepoints can fire:
//! `kvm_exit`, `kvm_entry`, `kvm_inj_virq` and `kvm_hypercall` fire only on VMX/SVM
//! hosts; on PVM (nested, no hardware virtualization) they never do.

use std::path::Path;

/// The host's KVM backend, from the loaded kernel modules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr)]
#[strum(serialize_all = "kebab-case")]
pub enum Backend {
    /// Intel VT-x (`kvm_intel`).
    Vmx,
    /// AMD-V (`kvm_amd`).
    Svm,
    /// Pagetable-based Virtual Machine (`kvm_pvm`).
    Pvm,
    /// None of the above is loaded (or built in without a module directory).
    Unknown,
}

impl Backend {
    /// Detects the backend from `/sys/module` (or another root, for tests).
    pub fn detect(sys_module: &Path) -> Backend {
        let loaded = |module: &str| sys_module.join(module).exists();
        if loaded("kvm_intel") {
            Backend::Vmx
        } else if loaded("kvm_amd") {
            Backend::Svm
        } else if loaded("kvm_pvm") {
            Backend::Pvm
        } else {
            Backend::Unknown
        }
    }

    /// Detects the backend of the running host.
    pub fn of_host() -> Backend {
        Backend::detect(Path::new("/sys/module"))
    }

    /// Stable name for reports.
    pub fn name(self) -> &'static str {
        self.into()
    }

    /// Whether `kvm_exit`/`kvm_entry` fire for every exit on this backend.
    pub fn traces_every_exit(self) -> bool {
        matches!(self, Backend::Vmx | Backend::Svm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backend_is_read_from_the_loaded_modules() {
        let root = std::env::temp_dir().join(format!("paratick-backend-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("kvm")).unwrap();
        assert_eq!(Backend::detect(&root), Backend::Unknown);
        std::fs::create_dir(root.join("kvm_pvm")).unwrap();
        assert_eq!(Backend::detect(&root), Backend::Pvm);
        std::fs::create_dir(root.join("kvm_amd")).unwrap();
        assert_eq!(Backend::detect(&root), Backend::Svm);
        std::fs::create_dir(root.join("kvm_intel")).unwrap();
        assert_eq!(Backend::detect(&root), Backend::Vmx);
        assert!(Backend::Vmx.traces_every_exit() && !Backend::Pvm.traces_every_exit());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
