//! Just enough of the kernel's BTF (`/sys/kernel/btf/vmlinux`, and a module's split BTF
//! such as `/sys/kernel/btf/kvm`) to find where a member of a struct is: the observer's
//! raw tracepoint programs read KVM's counters out of `struct kvm_vcpu`, whose layout is the running
//! kernel's. Format: Documentation/bpf/btf.rst.

use std::path::Path;

const BTF_MAGIC: u16 = 0xeb9f;
const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_ENUM64: u32 = 19;
/// TYPEDEF, VOLATILE, CONST, RESTRICT and TYPE_TAG: a type's name or qualifier only.
const MODIFIER_KINDS: [u32; 5] = [8, 9, 10, 11, 18];

/// One BTF blob (the base, or a module's split BTF on top of it).
struct Blob {
    types: Vec<u8>,
    strings: Vec<u8>,
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

impl Blob {
    fn parse(raw: &[u8]) -> Result<Blob, String> {
        let magic = u16::from_le_bytes(raw.get(0..2).ok_or("truncated")?.try_into().expect("2 bytes"));
        if magic != BTF_MAGIC {
            return Err(format!("bad magic {magic:#x}"));
        }
        let field = |at: usize| u32_at(raw, at).map(|v| v as usize).ok_or("truncated header");
        let header_len = field(4)?;
        let (type_off, type_len, str_off, str_len) = (field(8)?, field(12)?, field(16)?, field(20)?);
        let section = |off: usize, len: usize| {
            raw.get(header_len + off..header_len + off + len).map(<[u8]>::to_vec).ok_or("section out of range")
        };
        Ok(Blob { types: section(type_off, type_len)?, strings: section(str_off, str_len)? })
    }
}

/// One type's header, found by its id.
#[derive(Clone, Copy)]
struct TypeEntry {
    blob: usize,
    name_off: usize,
    kind: u32,
    vlen: usize,
    kind_flag: bool,
    /// `size` or `type`, by kind.
    size_or_type: u32,
    /// Where the kind-specific data starts in the blob's type section.
    data: usize,
}

/// The kernel's BTF: the base and any split module blobs, its types indexed by id (split
/// BTF ids continue after the base's).
pub struct KernelBtf {
    blobs: Vec<Blob>,
    /// Index 0 is `void`, which has no entry of its own.
    types: Vec<Option<TypeEntry>>,
}

impl KernelBtf {
    /// Reads vmlinux's BTF and, where present, the named modules' (kvm's types live in
    /// the kvm module when KVM is not built in).
    pub fn load(dir: &Path, modules: &[&str]) -> Result<KernelBtf, String> {
        let read = |name: &str| std::fs::read(dir.join(name)).map_err(|e| format!("{}: {e}", dir.join(name).display()));
        let mut blobs = vec![Blob::parse(&read("vmlinux")?).map_err(|e| format!("vmlinux BTF: {e}"))?];
        for module in modules {
            if dir.join(module).exists() {
                blobs.push(Blob::parse(&read(module)?).map_err(|e| format!("{module} BTF: {e}"))?);
            }
        }
        let mut types = vec![None];
        for (blob, Blob { types: section, .. }) in blobs.iter().enumerate() {
            let mut at = 0;
            while at + 12 <= section.len() {
                let info = u32_at(section, at + 4).expect("in range");
                let entry = TypeEntry {
                    blob,
                    name_off: u32_at(section, at).expect("in range") as usize,
                    kind: (info >> 24) & 0x1f,
                    vlen: (info & 0xffff) as usize,
                    kind_flag: info >> 31 == 1,
                    size_or_type: u32_at(section, at + 8).expect("in range"),
                    data: at + 12,
                };
                at = entry.data + kind_data_len(entry.kind, entry.vlen);
                types.push(Some(entry));
            }
        }
        Ok(KernelBtf { blobs, types })
    }

    /// A name by string offset: split BTF offsets continue after the base's strings.
    fn name(&self, blob: usize, offset: usize) -> Option<&str> {
        let (strings, offset) = if blob > 0 && offset >= self.blobs[0].strings.len() {
            (&self.blobs[blob].strings, offset - self.blobs[0].strings.len())
        } else {
            (&self.blobs[0].strings, offset)
        };
        let rest = strings.get(offset..)?;
        std::str::from_utf8(&rest[..rest.iter().position(|&b| b == 0)?]).ok()
    }

    fn entry(&self, id: u32) -> Option<TypeEntry> {
        self.types.get(id as usize).copied().flatten()
    }

    /// The type behind typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> u32 {
        while let Some(entry) = self.entry(id).filter(|e| MODIFIER_KINDS.contains(&e.kind)) {
            id = entry.size_or_type;
        }
        id
    }

    /// The bit offset and type of `member` in the struct or union `id`, looking inside
    /// its anonymous struct and union members too.
    fn find_member(&self, id: u32, member: &str) -> Option<(u32, u32)> {
        let entry = self.entry(id).filter(|e| e.kind == KIND_STRUCT || e.kind == KIND_UNION)?;
        let types = &self.blobs[entry.blob].types;
        for index in 0..entry.vlen {
            let m = entry.data + 12 * index;
            let (name, ty, offset) = (u32_at(types, m)?, u32_at(types, m + 4)?, u32_at(types, m + 8)?);
            // With kind_flag the low 24 bits are the bit offset.
            let bits = if entry.kind_flag { offset & 0xff_ffff } else { offset };
            match self.name(entry.blob, name as usize) {
                Some(found) if found == member => return Some((bits, ty)),
                Some("") => {
                    if let Some((inner, ty)) = self.find_member(self.resolve(ty), member) {
                        return Some((bits + inner, ty));
                    }
                }
                _ => {}
            }
        }
        None
    }

    /// The byte size of each argument of tracepoint `name` (its `TP_PROTO`, after the
    /// hidden `__data`), from the `btf_trace_NAME` typedef the kernel declares for raw
    /// tracepoint programs.
    pub fn tracepoint_arg_sizes(&self, name: &str) -> Result<Vec<u32>, String> {
        let typedef = format!("btf_trace_{name}");
        let id = (1..self.types.len() as u32)
            .find(|&id| {
                self.entry(id)
                    .is_some_and(|e| e.kind == KIND_TYPEDEF && self.name(e.blob, e.name_off) == Some(&typedef))
            })
            .ok_or_else(|| format!("no {typedef} in the kernel's BTF"))?;
        let pointer = self.entry(self.resolve(id)).filter(|e| e.kind == KIND_PTR);
        let proto = pointer
            .and_then(|p| self.entry(self.resolve(p.size_or_type)))
            .filter(|e| e.kind == KIND_FUNC_PROTO)
            .ok_or_else(|| format!("{typedef} is not a function pointer"))?;
        let types = &self.blobs[proto.blob].types;
        (1..proto.vlen)
            .map(|index| {
                let ty = u32_at(types, proto.data + 8 * index + 4).ok_or("truncated BTF")?;
                let entry = self.entry(self.resolve(ty)).ok_or_else(|| format!("{typedef}: argument {index}"))?;
                match entry.kind {
                    KIND_PTR => Ok(8),
                    KIND_INT | KIND_ENUM | KIND_ENUM64 | KIND_STRUCT | KIND_UNION => Ok(entry.size_or_type),
                    kind => Err(format!("{typedef}: argument {index} of BTF kind {kind}")),
                }
            })
            .collect()
    }

    /// The byte offset of `path` in `struct name`: a member, or members of members
    /// separated by dots (`f_path.dentry`); members of anonymous structs and unions are
    /// found as C finds them.
    pub fn member_offset(&self, name: &str, path: &str) -> Result<u32, String> {
        let id = (1..self.types.len() as u32)
            .find(|&id| {
                self.entry(id)
                    .is_some_and(|e| e.kind == KIND_STRUCT && e.vlen > 0 && self.name(e.blob, e.name_off) == Some(name))
            })
            .ok_or_else(|| format!("no struct {name} in the kernel's BTF"))?;
        let (mut current, mut bits) = (id, 0);
        for member in path.split('.') {
            let (offset, ty) =
                self.find_member(current, member).ok_or_else(|| format!("struct {name} has no member {path}"))?;
            bits += offset;
            current = self.resolve(ty);
        }
        Ok(bits / 8)
    }
}

/// Bytes of kind-specific data after a type's 12-byte header.
fn kind_data_len(kind: u32, vlen: usize) -> usize {
    match kind {
        1 => 4,             // INT
        3 => 12,            // ARRAY
        4 | 5 => 12 * vlen, // STRUCT, UNION
        6 => 8 * vlen,      // ENUM
        13 => 8 * vlen,     // FUNC_PROTO
        14 => 4,            // VAR
        15 => 12 * vlen,    // DATASEC
        17 => 4,            // DECL_TAG
        19 => 12 * vlen,    // ENUM64
        _ => 0,             // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_running_kernels_kvm_vcpu_has_its_counters_where_btf_says() {
        let btf = KernelBtf::load(Path::new("/sys/kernel/btf"), &["kvm"]).unwrap();
        let stat = btf.member_offset("kvm_vcpu", "stat").unwrap();
        let vcpu_id = btf.member_offset("kvm_vcpu", "vcpu_id").unwrap();
        assert!(stat > vcpu_id && stat < 64 * 1024, "stat at {stat}, vcpu_id at {vcpu_id}");
        // A well-known layout: `struct list_head { next, prev }`.
        assert_eq!(btf.member_offset("list_head", "prev").unwrap(), 8);
        assert!(btf.member_offset("kvm_vcpu", "no_such_member").unwrap_err().contains("has no member"));
        // Paths, through anonymous unions (`file.f_path`, `dentry.d_name`, `qstr.name`).
        let f_path = btf.member_offset("file", "f_path").unwrap();
        assert_eq!(btf.member_offset("file", "f_path.dentry").unwrap(), f_path + 8);
        assert_eq!(btf.member_offset("qstr", "name").unwrap(), 8);
        let d_name = btf.member_offset("dentry", "d_name").unwrap();
        assert_eq!(btf.member_offset("dentry", "d_name.name").unwrap(), d_name + 8);
        assert!(btf.member_offset("no_such_struct_xyz", "a").unwrap_err().contains("no struct"));
        // Raw tracepoint arguments: kvm_msr(unsigned write, u32 ecx, u64 data, bool exception).
        assert_eq!(btf.tracepoint_arg_sizes("kvm_msr").unwrap(), [4, 4, 8, 1]);
        assert!(btf.tracepoint_arg_sizes("no_such_tracepoint").unwrap_err().contains("no btf_trace_"));
    }

    /// The raw tracepoint programs read arguments by position: the table's sizes must be
    /// the running kernel's for every tracepoint it has.
    #[test]
    fn the_raw_tracepoint_arguments_of_the_table_are_the_running_kernels() {
        use paratick_common::event::EventKind;
        let btf = KernelBtf::load(Path::new("/sys/kernel/btf"), &["kvm"]).unwrap();
        let mut checked = 0;
        for kind in EventKind::ALL {
            let Some(raw) = kind.raw() else { continue };
            let expected: Vec<u32> = raw.arg_sizes.iter().map(|&size| u32::from(size)).collect();
            assert_eq!(btf.tracepoint_arg_sizes(kind.tracepoint()).unwrap(), expected, "{}", kind.tracepoint());
            checked += 1;
        }
        assert_eq!(checked, EventKind::ALL.len() - 1, "all but kvm_exit");
    }

    /// BTF is a second source of the tracepoint layouts (`struct trace_event_raw_NAME`):
    /// on the running kernel it must agree with the format files the observer uses.
    #[test]
    fn the_format_files_field_offsets_agree_with_btf() {
        use paratick_common::event::{EventKind, FORK_CHILD_PID};
        let btf = KernelBtf::load(Path::new("/sys/kernel/btf"), &["kvm"]).unwrap();
        let events = EventKind::ALL.iter().map(|kind| ("kvm", kind.tracepoint(), kind.fields()));
        let mut checked = 0;
        for (group, event, fields) in events.chain([("sched", "sched_process_fork", &[FORK_CHILD_PID][..])]) {
            let path = format!("/sys/kernel/tracing/events/{group}/{event}/format");
            let format = crate::format::parse(&std::fs::read_to_string(&path).unwrap()).unwrap();
            for name in fields.iter().flat_map(|spec| spec.names) {
                let Some(field) = format.field(name) else { continue };
                let from_btf = btf.member_offset(&format!("trace_event_raw_{event}"), name).unwrap();
                assert_eq!(from_btf, field.offset, "{event}.{name}: BTF and {path} disagree");
                checked += 1;
            }
        }
        assert!(checked >= 20, "only {checked} fields checked");
    }
}
