//! The reference dongle firmware on QEMU's netduinoplus2 (STM32F405).
//!
//! The dongle is `dongle-core`'s, the simulator's own logic; this file is the thin driver around it:
//! - USART1 is the host link (SPEC 4.3 framing, done by `dongle_core::board::StreamHost`);
//! - USART2 is the console: it prints `ready` once the link listens, every event (the PIN is
//!   `PIN 123456 (120 s)`, the technician's display), and what typed commands answer;
//! - the flash is RAM (QEMU's flash interface is a stub), so a restart is a factory reset;
//! - the CAN bus is RAM too (QEMU emulates no CAN controller): a frame put on the bus comes back as
//!   a frame from another node, as if an ECU echoed it, so the board has traffic of its own.
#![no_std]
#![no_main]

mod host;
mod hw;

use core::fmt::Write;

use cortex_m_rt::{ExceptionFrame, entry, exception};
use dongle_core::board::{Board, StreamHost};
use dongle_core::text::Text;
use dongle_core::time::Ticks;
use dongle_core::{Dongle, Event, Flash, Frame};
use rand::SeedableRng;
use rand::rngs::StdRng;
use stm32f4::stm32f405 as pac;

use crate::hw::Console;

/// Frames the RAM bus holds before it drops (and counts) what the dongle puts on it.
const BUS_DEPTH: usize = 256;
/// Frames handed to the dongle at once: about one CAN_BATCH packet's worth.
const BUS_CHUNK: usize = 64;
/// The longest console line.
const CONSOLE_LINE: usize = 256;

/// What the dongle core asks of this board.
struct QemuBoard {
    console: Console,
    /// Frames on the RAM bus, to come back to the dongle as another node's.
    bus: heapless::Deque<Frame, BUS_DEPTH>,
    bus_dropped: u64,
    /// The "flash": the last stored image.
    flash: Option<[u8; dongle_core::flash::IMAGE_LEN]>,
}

impl Board for QemuBoard {
    fn to_host(&mut self, bytes: &[u8]) {
        hw::link_write(bytes);
    }

    fn to_bus(&mut self, frame: Frame) -> bool {
        if self.bus.push_back(frame).is_ok() {
            return true;
        }
        self.bus_dropped += 1;
        if self.bus_dropped.is_power_of_two() {
            let _ = writeln!(
                self.console,
                "bus full: {} frames dropped",
                self.bus_dropped
            );
        }
        false
    }

    fn event(&mut self, event: Event) {
        let c = &mut self.console;
        let _ = match event {
            // The one line a technician reads: hosts and tests look for exactly this form.
            Event::Pin { pin, seconds, .. } => writeln!(c, "PIN {} ({seconds} s)", pin.as_str()),
            Event::UartAnswered {
                exit_code,
                output,
                reported,
            } => writeln!(
                c,
                "{output}[exit {exit_code}, reported to host: {reported}]"
            ),
            other => writeln!(c, "{other:?}"),
        };
    }

    fn store_flash(&mut self, flash: &Flash) {
        self.flash = Some(flash.to_image());
    }
}

#[entry]
fn main() -> ! {
    let (Some(dp), Some(cp)) = (pac::Peripherals::take(), cortex_m::Peripherals::take()) else {
        panic!("peripherals taken twice");
    };
    let (mut link, console, mut clock) = hw::init(dp, cp.SYST);
    // The board and the stream host (about 32 KiB together) live in statics rather than on the
    // stack, so that the linker's figure for RAM counts them.
    let Some(board) = cortex_m::singleton!(: QemuBoard = QemuBoard {
        console,
        bus: heapless::Deque::new(),
        bus_dropped: 0,
        flash: None,
    }) else {
        panic!("the board was made twice");
    };
    let _ = writeln!(
        board.console,
        "dongle-fw-qemu {}: reading settings (semihosting must be on)",
        env!("CARGO_PKG_VERSION")
    );
    let settings = host::settings(dongle_core::dongle::build_string(
        "dongle-fw-qemu",
        env!("CARGO_PKG_VERSION"),
    ));
    if settings.unreadable {
        let _ = writeln!(
            board.console,
            "could not read the semihosting command line (longer than 256 bytes?): every setting is \
             the default, and the random seed comes from the clock, which is not secret"
        );
    }
    for word in &settings.rejected {
        let _ = writeln!(board.console, "ignored setting {word:?}");
    }
    if settings.more_rejected > 0 {
        let _ = writeln!(
            board.console,
            "ignored {} more settings",
            settings.more_rejected
        );
    }
    let wall_ms = host::unix_seconds().saturating_mul(1000);
    let seed = settings.seed.unwrap_or_else(|| {
        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&wall_ms.to_le_bytes());
        seed[8..16].copy_from_slice(&clock.now_us().to_le_bytes());
        seed
    });
    let rng = StdRng::from_seed(seed);
    let flash = Flash::new(settings.device_id);
    let mut dongle: Dongle<Ticks, StdRng> =
        Dongle::new(settings.dongle, flash, Ticks(clock.now_us()), wall_ms, rng);
    let Some(stream) = cortex_m::singleton!(: StreamHost<Ticks> = StreamHost::new()) else {
        panic!("the stream host was made twice");
    };
    let _ = writeln!(
        board.console,
        "ready: device {} capabilities {:#06x}",
        dongle.device_id(),
        dongle.capabilities()
    );

    let mut chunk = [0u8; 256];
    let mut line = Text::<CONSOLE_LINE>::new();
    loop {
        let now = Ticks(clock.now_us());
        let n = link.read(&mut chunk);
        if n > 0 {
            stream.receive(&mut dongle, now, &chunk[..n], board);
        }
        while let Some(byte) = board.console.read_byte() {
            match byte {
                b'\r' | b'\n' if !line.is_empty() => {
                    let command = core::mem::take(&mut line);
                    stream.uart_command(&mut dongle, now, &command, board);
                }
                b'\r' | b'\n' => {}
                _ => {
                    // A line longer than the console's is cut there.
                    let _ = line.push(char::from(byte));
                }
            }
        }
        // The bus's frames go to the dongle a few at a time, through a small buffer on the stack:
        // the bus itself lives in a static and may hold 18 KiB of frames.
        for _ in 0..BUS_DEPTH.div_ceil(BUS_CHUNK) {
            let mut frames = heapless::Vec::<Frame, BUS_CHUNK>::new();
            while !frames.is_full()
                && let Some(frame) = board.bus.pop_front()
            {
                let _ = frames.push(frame);
            }
            if frames.is_empty() {
                break;
            }
            stream.bus_frames(&mut dongle, now, &frames, board);
        }
        stream.poll(&mut dongle, now, board);

        // Sleep until the next interrupt (a link byte, or SysTick's millisecond). Interrupts are
        // masked around the check, so a byte that arrives just before `wfi` still wakes it.
        cortex_m::interrupt::disable();
        if !link.ready() && board.bus.is_empty() {
            cortex_m::asm::wfi();
        }
        // SAFETY: re-enables what was disabled just above.
        unsafe { cortex_m::interrupt::enable() };
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    cortex_m::interrupt::disable();
    let _ = writeln!(Console, "PANIC: {info}");
    // Ends QEMU with a failing status (semihosting is on wherever this board runs).
    cortex_m_semihosting::debug::exit(cortex_m_semihosting::debug::EXIT_FAILURE);
    loop {
        cortex_m::asm::wfi();
    }
}

#[exception]
unsafe fn HardFault(frame: &ExceptionFrame) -> ! {
    let _ = writeln!(
        Console,
        "HARDFAULT pc={:#010x} lr={:#010x} (is semihosting on? -semihosting-config enable=on,target=native)",
        frame.pc(),
        frame.lr()
    );
    loop {
        cortex_m::asm::wfi();
    }
}
