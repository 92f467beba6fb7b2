//! The static build (`make static-ga`, built here the same way by the
//! test harness): it has no program interpreter (no dynamic loader needed)
//! and runs. `integration-tests/tests/guest_e2e.rs` runs it inside a real
//! guest.

use qvirt_integration_tests::static_ga;

/// The `p_type` of each program header of a 64-bit little-endian ELF file.
fn program_header_types(elf: &[u8]) -> Result<Vec<u32>, String> {
    let u16_at = |o: usize| -> Result<u16, String> {
        elf.get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .ok_or_else(|| format!("short file at {o}"))
    };
    let u32_at = |o: usize| -> Result<u32, String> {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(|| format!("short file at {o}"))
    };
    if elf.get(..6) != Some(b"\x7fELF\x02\x01") {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    let phoff = u32_at(0x20)? as usize | ((u32_at(0x24)? as usize) << 32);
    let phentsize = u16_at(0x36)? as usize;
    let phnum = u16_at(0x38)? as usize;
    (0..phnum).map(|i| u32_at(phoff + i * phentsize)).collect()
}

const PT_LOAD: u32 = 1;
const PT_INTERP: u32 = 3;

#[test]
fn test_static_binary_needs_no_loader() {
    let bin = static_ga();
    let elf = std::fs::read(&bin).expect("read the static binary");
    let types = program_header_types(&elf).expect("ELF");
    assert!(types.contains(&PT_LOAD), "no PT_LOAD: {types:?}");
    assert!(
        !types.contains(&PT_INTERP),
        "{} has a PT_INTERP: it is dynamically linked",
        bin.display()
    );
    let out = std::process::Command::new(&bin)
        .arg("-V")
        .output()
        .expect("run the static binary");
    assert!(out.status.success());
    assert!(
        out.stdout.starts_with(b"QEMU Guest Agent 7.2"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// The check itself: the debug build of this test's own agent is
/// dynamically linked, so it must be caught.
#[test]
fn test_interp_check_catches_a_dynamic_binary() {
    let elf = std::fs::read(env!("CARGO_BIN_EXE_qvirt-ga")).expect("read");
    let types = program_header_types(&elf).expect("ELF");
    assert!(types.contains(&PT_INTERP), "{types:?}");
}
