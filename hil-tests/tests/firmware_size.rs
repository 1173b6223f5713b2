//! The reference firmware's images fit their chips: the QEMU board's in the STM32F405's flash and
//! RAM, the H753's in flash bank 1 (bank 2's last sector holds the dongle's state) and in the RAM its
//! memory map gives the program. The sizes are printed; docs/BENCHMARKS.md keeps them.

use qemu_dongle::QemuConfig;
use qemu_dongle::image;

/// Board, binary, flash it may use, RAM it may reserve before `main` (the stack needs the rest).
const BOARDS: [(&str, &str, u64, u64); 2] = [
    // 128 KiB of SRAM, 16 KiB of it left to the stack.
    (
        "QEMU netduinoplus2 (STM32F405)",
        "dongle-qemu",
        1024 * 1024,
        112 * 1024,
    ),
    // 512 KiB of AXI SRAM, 64 KiB of it left to the stack.
    ("STM32H753", "dongle-h753", 1024 * 1024, 448 * 1024),
];

#[test]
#[cfg_attr(
    not(feature = "firmware-built"),
    ignore = "the firmware is not built: scripts/test builds it ((cd firmware && cargo build --release)) and turns on hil-tests/firmware-built"
)]
fn the_firmware_images_fit_their_chips() {
    let dir = QemuConfig::default_elf()
        .parent()
        .expect("the firmware's target folder")
        .to_path_buf();
    for (board, binary, flash_budget, ram_budget) in BOARDS {
        let path = dir.join(binary);
        let size = image::size(&path).unwrap_or_else(|e| panic!("{board}: {e}"));
        println!(
            "{board}: flash {} bytes ({:.1} KiB), static RAM {} bytes ({:.1} KiB)",
            size.flash,
            size.flash as f64 / 1024.0,
            size.ram,
            size.ram as f64 / 1024.0
        );
        assert!(
            size.flash <= flash_budget,
            "{board}: {} bytes of flash, more than the {flash_budget} it may use",
            size.flash
        );
        assert!(
            size.ram <= ram_budget,
            "{board}: {} bytes of static RAM, more than the {ram_budget} it may reserve",
            size.ram
        );
    }
}
