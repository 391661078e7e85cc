//! Parser for tracefs event format files (`/sys/kernel/tracing/events/<group>/<event>/format`)
//! and resolution of the fields our eBPF programs read into [`TracepointLayout`]s.
//!
//! Offsets are never hard-coded: fields were added, renamed and moved between kernel
//! versions (e.g. `kvm_exit` gained `vcpu_id` and `requests`, `kvm_inj_virq` renamed
//! `irq` to `vector`, `sched_process_fork` turned its comms into `__data_loc` strings).

use paratick_common::event::{FieldSlot, FieldSpec, TracepointLayout, MAX_FIELDS};

/// A parsed format file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventFormat {
    /// Event name (`name:` line).
    pub name: String,
    /// Event id (`ID:` line).
    pub id: u32,
    /// All fields, common ones included, in file order.
    pub fields: Vec<FormatField>,
}

/// One `field:` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatField {
    /// Field name, without type or array suffix.
    pub name: String,
    /// Byte offset in the record.
    pub offset: u32,
    /// Size in bytes.
    pub size: u32,
    /// Whether the field is signed.
    pub signed: bool,
}

/// Why a format file could not be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    /// A line that should be a field or a header is not well formed.
    #[error("line {line}: malformed format line {text:?}")]
    Malformed {
        /// 1-based line number.
        line: usize,
        /// The line.
        text: String,
    },
    /// The `name:` or `ID:` header is missing.
    #[error("missing `{0}:` header")]
    MissingHeader(&'static str),
    /// A field the program needs is not in this kernel's record.
    #[error("event {event} has no field {wanted} (this kernel's layout is not supported)")]
    MissingField {
        /// Event name.
        event: String,
        /// Accepted names, joined by `|`.
        wanted: String,
    },
    /// A field has a size the program cannot read as an integer.
    #[error("event {event} field {field} has size {size}, not 1, 2, 4 or 8")]
    UnsupportedSize {
        /// Event name.
        event: String,
        /// Field name.
        field: String,
        /// Its size.
        size: u32,
    },
    /// A field lies beyond what a record offset can express.
    #[error("event {event} field {field} offset {offset} is out of range")]
    OffsetOutOfRange {
        /// Event name.
        event: String,
        /// Field name.
        field: String,
        /// Its offset.
        offset: u32,
    },
}

/// Parses the text of a format file.
pub fn parse(text: &str) -> Result<EventFormat, FormatError> {
    let mut name = None;
    let mut id = None;
    let mut fields = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = raw.trim();
        let malformed = || FormatError::Malformed { line: index + 1, text: raw.to_string() };
        if let Some(value) = line.strip_prefix("name:") {
            name = Some(value.trim().to_string());
        } else if let Some(value) = line.strip_prefix("ID:") {
            id = Some(value.trim().parse().map_err(|_| malformed())?);
        } else if line.starts_with("field:") {
            fields.push(parse_field(line).ok_or_else(malformed)?);
        } else if line.starts_with("print fmt:") {
            break;
        }
    }
    Ok(EventFormat {
        name: name.ok_or(FormatError::MissingHeader("name"))?,
        id: id.ok_or(FormatError::MissingHeader("ID"))?,
        fields,
    })
}

/// Parses one `field:<declaration>; offset:N; size:N; signed:N;` line (tab-separated).
fn parse_field(line: &str) -> Option<FormatField> {
    let mut parts = line.split(';').map(str::trim).filter(|p| !p.is_empty());
    let decl = parts.next()?.strip_prefix("field:")?;
    let mut offset = None;
    let mut size = None;
    let mut signed = false;
    for part in parts {
        let (key, value) = part.split_once(':')?;
        let value: u32 = value.trim().parse().ok()?;
        match key.trim() {
            "offset" => offset = Some(value),
            "size" => size = Some(value),
            "signed" => signed = value != 0,
            _ => {}
        }
    }
    // The name is the last identifier of the declaration, before any array suffix
    // (`char comm[16]`, `__data_loc char[] name`).
    let decl = decl.trim();
    let decl = match decl.find('[') {
        Some(bracket) if decl.ends_with(']') && !decl[..bracket].ends_with(' ') => &decl[..bracket],
        _ => decl,
    };
    let name = decl.rsplit(|c: char| c.is_whitespace() || c == '*').next()?;
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return None;
    }
    Some(FormatField { name: name.to_string(), offset: offset?, size: size?, signed })
}

impl EventFormat {
    /// The field called `name`, if this kernel has it.
    pub fn field(&self, name: &str) -> Option<&FormatField> {
        self.fields.iter().find(|f| f.name == name)
    }

    /// Resolves the slots a program reads: each spec's first name present in this
    /// format; a missing required field is an error, a missing optional one is absent.
    pub fn layout(&self, specs: &[FieldSpec]) -> Result<TracepointLayout, FormatError> {
        assert!(specs.len() <= MAX_FIELDS, "more field specs than slots");
        let mut layout = TracepointLayout::default();
        for (slot, spec) in layout.fields.iter_mut().zip(specs) {
            match spec.names.iter().find_map(|name| self.field(name)) {
                Some(field) => *slot = self.slot(field)?,
                None if spec.required => {
                    return Err(FormatError::MissingField { event: self.name.clone(), wanted: spec.names.join("|") })
                }
                None => {}
            }
        }
        Ok(layout)
    }

    fn slot(&self, field: &FormatField) -> Result<FieldSlot, FormatError> {
        if !matches!(field.size, 1 | 2 | 4 | 8) {
            return Err(FormatError::UnsupportedSize {
                event: self.name.clone(),
                field: field.name.clone(),
                size: field.size,
            });
        }
        let offset = u16::try_from(field.offset).map_err(|_| FormatError::OffsetOutOfRange {
            event: self.name.clone(),
            field: field.name.clone(),
            offset: field.offset,
        })?;
        Ok(FieldSlot { offset, size: field.size as u16 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use paratick_common::event::{EventKind, FORK_CHILD_PID};

    /// Format files by kernel: 6.18 as read from a running kernel; 5.4, 6.1 and 6.8
    /// reconstructed from that release's `TRACE_EVENT` definitions (see fixtures/README.md).
    fn fixture(kernel: &str, event: &str) -> EventFormat {
        let path = format!("{}/../paratick-common/fixtures/linux-{kernel}/{event}.format", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        parse(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn slot(offset: u16, size: u16) -> FieldSlot {
        FieldSlot { offset, size }
    }

    #[test]
    fn kvm_exit_layout_follows_the_kernel_version() {
        let specs = EventKind::KvmExit.fields();
        // 5.4: no vcpu_id; exits are counted with an unknown vCPU.
        let old = fixture("5.4", "kvm_exit").layout(specs).unwrap();
        assert_eq!(old.fields[..3], [slot(8, 4), slot(24, 4), FieldSlot::default()]);
        for kernel in ["6.1", "6.8", "6.18"] {
            let format = fixture(kernel, "kvm_exit");
            let layout = format.layout(specs).unwrap();
            assert_eq!(layout.fields[..3], [slot(8, 4), slot(24, 4), slot(56, 4)], "linux {kernel}");
            assert_eq!(format.field("requests").is_some(), kernel == "6.18", "linux {kernel}");
        }
    }

    #[test]
    fn kvm_inj_virq_reads_irq_on_old_kernels_and_vector_on_new_ones() {
        let specs = EventKind::KvmInjVirq.fields();
        let old = fixture("6.1", "kvm_inj_virq").layout(specs).unwrap();
        assert_eq!(old.fields[..2], [slot(8, 4), FieldSlot::default()]);
        for kernel in ["6.8", "6.18"] {
            let new = fixture(kernel, "kvm_inj_virq").layout(specs).unwrap();
            assert_eq!(new.fields[..2], [slot(8, 4), slot(12, 1)], "linux {kernel}");
        }
    }

    #[test]
    fn sched_process_fork_child_pid_moved_when_comms_became_dynamic() {
        let specs = [FORK_CHILD_PID];
        assert_eq!(fixture("6.1", "sched_process_fork").layout(&specs).unwrap().fields[0], slot(44, 4));
        assert_eq!(fixture("6.18", "sched_process_fork").layout(&specs).unwrap().fields[0], slot(20, 4));
    }

    #[test]
    fn every_program_resolves_against_the_running_kernel_fixture() {
        for kind in EventKind::ALL {
            let format = fixture("6.18", kind.tracepoint());
            assert_eq!(format.name, kind.tracepoint());
            format.layout(kind.fields()).unwrap_or_else(|e| panic!("{e}"));
        }
        let msr = fixture("6.18", "kvm_msr");
        assert_eq!(msr.id, 99);
        assert_eq!(msr.field("data"), Some(&FormatField { name: "data".into(), offset: 16, size: 8, signed: false }));
        let userspace_exit = fixture("6.18", "kvm_userspace_exit");
        assert!(userspace_exit.field("errno").unwrap().signed);
    }

    #[test]
    fn a_missing_required_field_is_an_error_that_names_it() {
        let text = "name: kvm_msr\nID: 7\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\tfield:unsigned write;\toffset:8;\tsize:4;\tsigned:0;\n";
        let err = parse(text).unwrap().layout(EventKind::KvmMsr.fields()).unwrap_err();
        assert_eq!(err, FormatError::MissingField { event: "kvm_msr".into(), wanted: "ecx".into() });
        assert_eq!(err.to_string(), "event kvm_msr has no field ecx (this kernel's layout is not supported)");
    }

    #[test]
    fn malformed_files_are_rejected_with_the_line() {
        let text = "name: kvm_pio\nID: 1\nformat:\n\tfield:unsigned int port;\toffset:x;\tsize:4;\tsigned:0;\n";
        assert_eq!(
            parse(text).unwrap_err(),
            FormatError::Malformed {
                line: 4,
                text: "\tfield:unsigned int port;\toffset:x;\tsize:4;\tsigned:0;".into()
            }
        );
        assert_eq!(parse("format:\n").unwrap_err(), FormatError::MissingHeader("name"));
        assert_eq!(parse("name: x\n").unwrap_err(), FormatError::MissingHeader("ID"));
    }

    #[test]
    fn fields_of_unreadable_size_are_rejected() {
        let text = "name: kvm_pio\nID: 1\nformat:\n\tfield:char port[16];\toffset:8;\tsize:16;\tsigned:0;\n\tfield:unsigned int rw;\toffset:24;\tsize:4;\tsigned:0;\n";
        let err = parse(text).unwrap().layout(EventKind::KvmPio.fields()).unwrap_err();
        assert!(matches!(err, FormatError::UnsupportedSize { size: 16, .. }), "{err}");
    }
}
