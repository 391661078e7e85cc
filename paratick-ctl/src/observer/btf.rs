//! Just enough of the kernel's BTF (`/sys/kernel/btf/vmlinux`, and a module's split BTF
//! such as `/sys/kernel/btf/kvm`) to find where a member of a struct is: the observer's
//! raw tracepoint programs read KVM's counters out of `struct kvm_vcpu`, whose layout is the running
//! kernel's. Format: Documentation/bpf/btf.rst.

use std::path::Path;

const BTF_MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;

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

/// The kernel's BTF: the base and any split module blobs, searched in order.
pub struct KernelBtf {
    blobs: Vec<Blob>,
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
        Ok(KernelBtf { blobs })
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

    /// The byte offset of `member` in `struct name` (a direct member).
    pub fn member_offset(&self, name: &str, member: &str) -> Result<u32, String> {
        for blob in 0..self.blobs.len() {
            let types = &self.blobs[blob].types;
            let mut at = 0;
            while at + 12 <= types.len() {
                let name_off = u32_at(types, at).expect("in range") as usize;
                let info = u32_at(types, at + 4).expect("in range");
                let (kind, vlen, kind_flag) = ((info >> 24) & 0x1f, (info & 0xffff) as usize, info >> 31);
                let data = at + 12;
                if kind == KIND_STRUCT && self.name(blob, name_off) == Some(name) && vlen > 0 {
                    for index in 0..vlen {
                        let m = data + 12 * index;
                        let (m_name, m_offset) = (u32_at(types, m), u32_at(types, m + 8));
                        let (Some(m_name), Some(m_offset)) = (m_name, m_offset) else { break };
                        if self.name(blob, m_name as usize) == Some(member) {
                            // With kind_flag the low 24 bits are the bit offset.
                            let bits = if kind_flag == 1 { m_offset & 0xff_ffff } else { m_offset };
                            return Ok(bits / 8);
                        }
                    }
                    return Err(format!("struct {name} has no member {member}"));
                }
                at = data + kind_data_len(kind, vlen);
            }
        }
        Err(format!("no struct {name} in the kernel's BTF"))
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
        assert!(btf.member_offset("no_such_struct_xyz", "a").unwrap_err().contains("no struct"));
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
            let format = crate::observer::format::parse(&std::fs::read_to_string(&path).unwrap()).unwrap();
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
