//! The peripherals QEMU's netduinoplus2 emulates, driven through the PAC: USART1 (the host link,
//! interrupt-driven receive into a ring), USART2 (the console, polled), TIM2 (the clock) and
//! SysTick (a 1 kHz wake-up).
//!
//! QEMU 7.2's facts this relies on (docs/HIL.md has them all):
//! - RCC, GPIO and the flash interface are stubs: clock gates are set as silicon needs, alternate
//!   pin functions are not, and QEMU ignores the baud rate.
//! - A USART drops what arrives while its receiver is off, so USART1 is enabled before anything
//!   else, and the firmware prints `ready` only when it listens; hosts wait for that line.
//! - While RXNE is set QEMU holds further input in its character device, so a full ring loses
//!   nothing: the interrupt leaves the byte in DR and masks itself until the main loop has room.
//!   (Clearing RXNEIE does not lower QEMU's interrupt line, hence the NVIC mask.)
//! - TIM2 counts QEMU's virtual clock at 1 GHz and tracks the host's clock; SysTick's ticks merge
//!   under host load, so it only wakes the loop.

use core::cell::RefCell;
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use cortex_m::peripheral::{NVIC, SYST, syst::SystClkSource};
use critical_section::Mutex;
use heapless::spsc::{Consumer, Producer, Queue};
use stm32f4::stm32f405::{self as pac, Interrupt, interrupt, usart1::RegisterBlock as Usart};

/// The core clock QEMU's netduinoplus2 runs at (its RCC cannot change it).
const CORE_HZ: u32 = 168_000_000;
/// TIM2's input clock under QEMU; the prescaler brings it to 1 MHz.
const TIM2_HZ: u32 = 1_000_000_000;
/// Bytes the link's receive ring holds (one slot stays empty).
const RX_RING: usize = 2048;

static RX_PRODUCER: Mutex<RefCell<Option<Producer<'static, u8>>>> = Mutex::new(RefCell::new(None));
/// Set by the interrupt when the ring was full and it masked itself.
static RX_STALLED: AtomicBool = AtomicBool::new(false);
/// How often the ring was full (QEMU held the bytes; nothing was lost).
static RX_STALLS: AtomicU32 = AtomicU32::new(0);

fn usart1() -> &'static Usart {
    // SAFETY: a fixed MMIO address; every access is one register read or write.
    unsafe { &*pac::USART1::ptr() }
}

fn usart2() -> &'static Usart {
    // SAFETY: as above.
    unsafe { &*pac::USART2::ptr() }
}

fn usart_enable(u: &Usart, rx_interrupt: bool) {
    // 115 200 Bd from the 16 MHz reset clock on silicon; QEMU ignores BRR.
    u.brr().write(|w| unsafe { w.bits(0x8B) });
    u.cr1().write(|w| {
        w.ue()
            .set_bit()
            .te()
            .set_bit()
            .re()
            .set_bit()
            .rxneie()
            .bit(rx_interrupt)
    });
}

fn usart_write(u: &Usart, bytes: &[u8]) {
    for &b in bytes {
        while u.sr().read().txe().bit_is_clear() {}
        u.dr().write(|w| w.dr().set(u16::from(b)));
    }
}

/// The receiving half of the host link.
pub struct LinkRx(Consumer<'static, u8>);

impl LinkRx {
    /// Moves received bytes into `buf`; returns how many.
    pub fn read(&mut self, buf: &mut [u8]) -> usize {
        let mut n = 0;
        for slot in buf.iter_mut() {
            match self.0.dequeue() {
                Some(b) => {
                    *slot = b;
                    n += 1;
                }
                None => break,
            }
        }
        if n > 0 && RX_STALLED.swap(false, Ordering::AcqRel) {
            // SAFETY: unmasking our own interrupt; its handler shares state only through the
            // ring and critical sections.
            unsafe { NVIC::unmask(Interrupt::USART1) };
        }
        n
    }

    /// Whether received bytes wait.
    pub fn ready(&self) -> bool {
        self.0.ready()
    }
}

/// Writes to the host link (blocking: QEMU's transmitter is always ready).
pub fn link_write(bytes: &[u8]) {
    usart_write(usart1(), bytes);
}

/// The console: USART2, written and polled.
pub struct Console;

impl Console {
    /// The next byte typed on the console, if one waits.
    pub fn read_byte(&mut self) -> Option<u8> {
        let u = usart2();
        u.sr()
            .read()
            .rxne()
            .bit_is_set()
            .then(|| u.dr().read().dr().bits() as u8)
    }
}

impl core::fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for line in s.split_inclusive('\n') {
            match line.strip_suffix('\n') {
                Some(text) => {
                    usart_write(usart2(), text.as_bytes());
                    usart_write(usart2(), b"\r\n");
                }
                None => usart_write(usart2(), line.as_bytes()),
            }
        }
        Ok(())
    }
}

/// A monotonic microsecond clock from TIM2's 32-bit count, widened to 64 bits by the main loop
/// (which reads it far more often than the 71 minutes a wrap takes).
pub struct Clock {
    last: u32,
    high: u64,
}

impl Clock {
    /// The current time in microseconds since boot.
    pub fn now_us(&mut self) -> u64 {
        // SAFETY: one register read.
        let count = unsafe { (*pac::TIM2::ptr()).cnt().read().bits() };
        if count < self.last {
            self.high += 1 << 32;
        }
        self.last = count;
        self.high | u64::from(count)
    }
}

/// Brings the board up: the link's receiver first, then the console, the clock and the wake-up.
pub fn init(dp: pac::Peripherals, mut syst: SYST) -> (LinkRx, Console, Clock) {
    dp.RCC.apb2enr().modify(|_, w| w.usart1en().set_bit());
    dp.RCC
        .apb1enr()
        .modify(|_, w| w.usart2en().set_bit().tim2en().set_bit());

    // `singleton!` hands out the queue once; `init` runs once, from `main`.
    let Some(queue) = cortex_m::singleton!(: Queue<u8, RX_RING> = Queue::new()) else {
        panic!("the board was brought up twice");
    };
    let (producer, consumer) = queue.split();
    critical_section::with(|cs| *RX_PRODUCER.borrow_ref_mut(cs) = Some(producer));
    usart_enable(usart1(), true);
    usart_enable(usart2(), false);
    // SAFETY: the handler below is ready for it.
    unsafe { NVIC::unmask(Interrupt::USART1) };

    let tim2 = &dp.TIM2;
    tim2.psc()
        .write(|w| unsafe { w.bits(TIM2_HZ / 1_000_000 - 1) });
    tim2.arr().write(|w| unsafe { w.bits(u32::MAX) });
    tim2.egr().write(|w| w.ug().set_bit());
    tim2.cr1().write(|w| w.cen().set_bit());

    syst.set_clock_source(SystClkSource::Core);
    syst.set_reload(CORE_HZ / 1000 - 1);
    syst.clear_current();
    syst.enable_interrupt();
    syst.enable_counter();

    (LinkRx(consumer), Console, Clock { last: 0, high: 0 })
}

#[cortex_m_rt::exception]
fn SysTick() {
    // Nothing to do: the tick only wakes the main loop from `wfi`.
}

#[interrupt]
fn USART1() {
    let u = usart1();
    critical_section::with(|cs| {
        let mut slot = RX_PRODUCER.borrow_ref_mut(cs);
        let Some(ring) = slot.as_mut() else {
            return;
        };
        while u.sr().read().rxne().bit_is_set() {
            if !ring.ready() {
                // Full: leave the byte in DR, so QEMU holds the rest, until the loop makes room.
                NVIC::mask(Interrupt::USART1);
                RX_STALLED.store(true, Ordering::Release);
                RX_STALLS.fetch_add(1, Ordering::Relaxed);
                return;
            }
            // Reading DR clears RXNE.
            let _ = ring.enqueue(u.dr().read().dr().bits() as u8);
        }
    });
}
