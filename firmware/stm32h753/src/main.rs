//! The reference dongle firmware on an STM32H753 (a NUCLEO-H753ZI: USB OTG FS on PA11/PA12, FDCAN1 on
//! PD0/PD1 to a CAN transceiver, USART3 on PD8 to the ST-LINK's virtual COM port).
//!
//! The dongle is `dongle-core`'s, the simulator's own logic, driven by
//! `dongle_core::board::StreamHost` as on the QEMU board; this file is the embassy driver around it:
//! - the host link is USB CDC-ACM (SPEC 4.3 framing in the packets' byte stream);
//! - the bus is FDCAN1 from an 80 MHz kernel clock (the clock the core's bit timing is computed for);
//!   a new CAN configuration restarts the controller with the core's prescaler and segments;
//! - the flash state is the last 128 KiB sector of bank 2, holding `Flash::to_image`, erased and
//!   written with the flash interrupt (the code runs from bank 1 meanwhile), so that a store, which
//!   takes up to seconds, never stops the executor: the USB device stays served (enumeration,
//!   suspend, control requests) while the dongle loop, and with it host packets and CAN, waits;
//! - PINs and nonces come from a ChaCha generator seeded by the RNG peripheral;
//! - the console is USART3 and RTT: the PIN as `PIN 123456 (120 s)` (the technician's display, and
//!   what a HIL rig's probe reads), every event.
//!
//! It is built and size-checked on every test run; it runs on a rig (docs/HIL.md), not here.
#![no_std]
#![no_main]

use core::fmt::Write;
use core::num::{NonZeroU8, NonZeroU16};

use dongle_core::board::{Board, StreamHost};
use dongle_core::flash::IMAGE_LEN;
use dongle_core::text::{Written, bounded};
use dongle_core::time::Ticks;
use dongle_core::{Dongle, DongleConfig, Event, Extensions, Flash, Frame};
use embassy_executor::Spawner;
use embassy_futures::join::join;
use embassy_futures::select::{Either3, select3};
use embassy_stm32::can::config::NominalBitTiming;
use embassy_stm32::can::{CanConfigurator, OperatingMode};
use embassy_stm32::flash::Flash as FlashDriver;
use embassy_stm32::peripherals::{FDCAN1, RNG, USB_OTG_FS};
use embassy_stm32::rng::Rng;
use embassy_stm32::usart::UartTx;
use embassy_stm32::{Config, bind_interrupts, can, rcc, rng, usb};
use embassy_time::{Instant, Timer, with_timeout};
use embassy_usb::class::cdc_acm::{CdcAcmClass, State};
use embassy_usb::driver::EndpointError;
use firmware_proto::ids::{CanId, DeviceId};
use firmware_proto::remp::CanMode;
use rand::SeedableRng;
use rand::rngs::StdRng;

bind_interrupts!(struct Irqs {
    OTG_FS => usb::InterruptHandler<USB_OTG_FS>;
    FDCAN1_IT0 => can::IT0InterruptHandler<FDCAN1>;
    FDCAN1_IT1 => can::IT1InterruptHandler<FDCAN1>;
    HASH_RNG => rng::InterruptHandler<RNG>;
    FLASH => embassy_stm32::flash::InterruptHandler;
});

/// What one step may send the host: the answers to the packets one USB packet completes, the
/// frames one CAN read brings, and every deferred answer falling due (each at most one framed
/// packet of about 1.5 KiB). A packet that finds no room is dropped and counted.
const TO_HOST_BYTES: usize = 16 * 1024;
/// Frames one step may put on the bus (a CAN_BATCH from the host carries at most about 170); a
/// frame beyond is dropped and counted, as one that finds no transmit buffer is.
const TO_BUS_FRAMES: usize = 256;
/// The longest console line; a longer one is cut.
const CONSOLE_LINE: usize = 256;
/// The flash sector that holds the state: bank 2's last (offsets from the start of flash).
const STATE_SECTOR: u32 = 0x1E_0000;
const STATE_SECTOR_END: u32 = 0x20_0000;
/// The image padded to the H7's 32-byte flash word.
const STATE_LEN: usize = IMAGE_LEN.div_ceil(32) * 32;
/// USB full-speed bulk packets.
const USB_PACKET: usize = 64;
/// How long a frame may wait for a free transmit buffer before it is dropped (and counted).
const CAN_TX_WAIT: embassy_time::Duration = embassy_time::Duration::from_millis(5);
/// How long the host may take to read what the dongle sends it after one step.
const USB_TX_WAIT: embassy_time::Duration = embassy_time::Duration::from_millis(200);

/// What the core asks of the board, collected during one step and carried out after it (the core's
/// calls are synchronous; USB and CAN writes are not).
struct H753Board {
    console: UartTx<'static, embassy_stm32::mode::Blocking>,
    to_host: heapless::Vec<u8, TO_HOST_BYTES>,
    to_bus: heapless::Vec<Frame, TO_BUS_FRAMES>,
    /// The CAN settings changed: restart the controller with them.
    can_changed: bool,
    last_can: dongle_core::timing::CanSettings,
    /// The image last stored (or about to be), so that an unchanged state does not wear the sector.
    stored: Option<[u8; IMAGE_LEN]>,
    /// An image to store once the step is done (the core's calls are synchronous, an erase is not).
    to_store: Option<[u8; IMAGE_LEN]>,
    /// Frames the bus did not take (no free transmit buffer in time, or evicted).
    bus_dropped: u64,
    /// Writes to the host lost: a step's answers the host did not read in time, or a packet that
    /// found no room in one step's buffer.
    host_dropped: u64,
}

impl H753Board {
    /// A console line: on USART3 (the ST-LINK's virtual COM port, what a technician reads) and on RTT
    /// up-channel 0 (what a HIL rig's probe reads, docs/HIL.md).
    fn log(&mut self, args: core::fmt::Arguments<'_>) {
        let mut line = Written::<CONSOLE_LINE>::new();
        let _ = line.write_fmt(args);
        let _ = self.console.blocking_write(line.as_bytes());
        let _ = self.console.blocking_write(b"\r\n");
        rtt_target::rprintln!("{}", line.as_str());
    }
}

impl H753Board {
    fn count_bus_drop(&mut self) {
        self.bus_dropped += 1;
        let dropped = self.bus_dropped;
        if dropped.is_power_of_two() {
            self.log(format_args!(
                "bus: {dropped} frames dropped (nobody acknowledges, or the queue is full)"
            ));
        }
    }
}

impl H753Board {
    fn count_host_drop(&mut self) {
        self.host_dropped += 1;
        let dropped = self.host_dropped;
        if dropped.is_power_of_two() {
            self.log(format_args!(
                "usb: {dropped} writes to the host lost (not read in time, or too much at once)"
            ));
        }
    }
}

impl Board for H753Board {
    fn to_host(&mut self, bytes: &[u8]) {
        // The host sees a lost packet as a request that timed out, as over a lossy link.
        if self.to_host.extend_from_slice(bytes).is_err() {
            self.count_host_drop();
        }
    }

    fn to_bus(&mut self, frame: Frame) -> bool {
        // Queued for the CAN loop; a frame that finds no transmit buffer in time is counted there,
        // one that finds this queue full here (the core counts it too).
        if self.to_bus.push(frame).is_err() {
            self.count_bus_drop();
            return false;
        }
        true
    }

    fn event(&mut self, event: Event) {
        match event {
            // The one line a technician (and the HIL target) reads.
            Event::Pin { pin, seconds, .. } => {
                self.log(format_args!("PIN {} ({seconds} s)", pin.as_str()));
            }
            // Refusals come from whoever sends packets, as fast as they like: the core counts them,
            // and writing each on the 115 200 Bd console would let a stranger slow the dongle down.
            Event::AuthRefused { .. } | Event::ReplayRefused { .. } => {}
            other => self.log(format_args!("{other:?}")),
        }
    }

    fn store_flash(&mut self, flash: &Flash) {
        if flash.can != self.last_can {
            self.last_can = flash.can;
            self.can_changed = true;
        }
        let image = flash.to_image();
        if self.stored == Some(image) {
            return;
        }
        self.stored = Some(image);
        self.to_store = Some(image);
    }
}

/// Writes a flash image to the state sector, waiting on the flash interrupt rather than spinning.
async fn store_image(
    driver: &mut FlashDriver<'static, embassy_stm32::flash::Async>,
    image: &[u8; IMAGE_LEN],
) -> Result<(), embassy_stm32::flash::Error> {
    let mut page = [0xffu8; STATE_LEN];
    page[..IMAGE_LEN].copy_from_slice(image);
    // Erase then write: a power loss in between leaves an erased sector, which reads as a fresh
    // dongle (the image's CRC guards against a torn write), never as someone else's token.
    driver.erase(STATE_SECTOR, STATE_SECTOR_END).await?;
    driver.write(STATE_SECTOR, &page).await
}

/// The clocks: 400 MHz from PLL1 (HSI 64 MHz / 4 * 50 / 2), FDCAN from PLL1 Q at 80 MHz, USB from
/// HSI48 trimmed by USB start-of-frame packets.
fn clocks() -> Config {
    let mut config = Config::default();
    let r = &mut config.rcc;
    r.hsi = Some(rcc::HSIPrescaler::DIV1);
    r.csi = true;
    r.hsi48 = Some(rcc::Hsi48Config {
        sync_from_usb: true,
    });
    r.pll1 = Some(rcc::Pll {
        source: rcc::PllSource::HSI,
        prediv: rcc::PllPreDiv::DIV4,
        mul: rcc::PllMul::MUL50,
        divp: Some(rcc::PllDiv::DIV2),
        divq: Some(rcc::PllDiv::DIV10),
        divr: None,
    });
    r.sys = rcc::Sysclk::PLL1_P;
    r.ahb_pre = rcc::AHBPrescaler::DIV2;
    r.apb1_pre = rcc::APBPrescaler::DIV2;
    r.apb2_pre = rcc::APBPrescaler::DIV2;
    r.apb3_pre = rcc::APBPrescaler::DIV2;
    r.apb4_pre = rcc::APBPrescaler::DIV2;
    r.voltage_scale = rcc::VoltageScale::Scale1;
    r.mux.fdcansel = rcc::mux::Fdcansel::PLL1_Q;
    r.mux.usbsel = rcc::mux::Usbsel::HSI48;
    config
}

/// A device id from the chip's 96-bit unique id, folded to the protocol's 64 bits.
fn device_id() -> DeviceId {
    let uid = embassy_stm32::uid::uid();
    let mut id = [0u8; 8];
    for (i, b) in uid.iter().enumerate() {
        id[i % 8] ^= b;
    }
    DeviceId(id)
}

fn can_frame(frame: &Frame) -> Option<can::frame::Frame> {
    let id = frame.id();
    if id.is_extended() {
        can::frame::Frame::new_extended(id.raw(), frame.data()).ok()
    } else {
        can::frame::Frame::new_standard(id.raw() as u16, frame.data()).ok()
    }
}

fn core_frame(frame: &can::frame::Frame) -> Option<Frame> {
    let id = match frame.id() {
        embedded_can::Id::Standard(id) => CanId::standard(id.as_raw()).ok()?,
        embedded_can::Id::Extended(id) => CanId::extended(id.as_raw()).ok()?,
    };
    Frame::classic(id, frame.data()).ok()
}

#[embassy_executor::main]
async fn main(_spawner: Spawner) {
    rtt_target::rtt_init_print!();
    let p = embassy_stm32::init(clocks());
    let console = match UartTx::new_blocking(p.USART3, p.PD8, Default::default()) {
        Ok(tx) => tx,
        Err(_) => panic!("USART3 does not take the default configuration"),
    };
    let mut flash_driver = FlashDriver::new(p.FLASH, Irqs);
    let mut image = [0u8; STATE_LEN];
    let stored = flash_driver
        .blocking_read(STATE_SECTOR, &mut image)
        .ok()
        .and_then(|()| {
            let mut exact = [0u8; IMAGE_LEN];
            exact.copy_from_slice(&image[..IMAGE_LEN]);
            Flash::from_image(&exact).ok()
        });
    let flash = stored.unwrap_or_else(|| Flash::new(device_id()));
    let mut board = H753Board {
        console,
        to_host: heapless::Vec::new(),
        to_bus: heapless::Vec::new(),
        can_changed: false,
        last_can: flash.can,
        stored: Some(flash.to_image()),
        to_store: None,
        bus_dropped: 0,
        host_dropped: 0,
    };

    let mut rng_peripheral = Rng::new(p.RNG, Irqs);
    let mut seed = [0u8; 32];
    if rng_peripheral.async_fill_bytes(&mut seed).await.is_err() {
        panic!("the RNG peripheral failed its seed");
    }
    let config = DongleConfig {
        fw_build: dongle_core::dongle::build_string("dongle-fw-h753", env!("CARGO_PKG_VERSION")),
        extensions: Extensions::ALL,
        // FDCAN can carry FD frames; this driver moves classic ones only so far, so the dongle does
        // not announce FD (and the core keeps to timing every STM32 CAN controller takes).
        fd: false,
        link: bounded("usb cdc-acm"),
        ..DongleConfig::default()
    };
    // No real-time clock is kept: a cool-down stored before a restart lasts its full length again.
    let mut dongle: Dongle<Ticks, StdRng> = Dongle::new(
        config,
        flash,
        Ticks(Instant::now().as_micros()),
        0,
        StdRng::from_seed(seed),
    );
    let mut stream: StreamHost<Ticks> = StreamHost::new();
    board.log(format_args!(
        "ready: device {} capabilities {:#06x}",
        dongle.device_id(),
        dongle.capabilities()
    ));

    // USB CDC-ACM: the host link.
    let mut ep_out_buffer = [0u8; 256];
    let mut usb_config = usb::Config::default();
    usb_config.vbus_detection = false;
    let driver = usb::Driver::new_fs(
        p.USB_OTG_FS,
        Irqs,
        p.PA12,
        p.PA11,
        &mut ep_out_buffer,
        usb_config,
    );
    let mut device_config = embassy_usb::Config::new(0x0483, 0x5740);
    device_config.manufacturer = Some("bridge");
    device_config.product = Some("CAN dongle (reference firmware)");
    let mut config_descriptor = [0; 256];
    let mut bos_descriptor = [0; 256];
    let mut control_buf = [0; 64];
    let mut state = State::new();
    let mut builder = embassy_usb::Builder::new(
        driver,
        device_config,
        &mut config_descriptor,
        &mut bos_descriptor,
        &mut [],
        &mut control_buf,
    );
    let class = CdcAcmClass::new(&mut builder, &mut state, USB_PACKET as u16);
    let mut usb = builder.build();
    let (mut usb_tx, mut usb_rx) = class.split();

    let mut fdcan = p.FDCAN1;
    let mut can_rx_pin = p.PD0;
    let mut can_tx_pin = p.PD1;

    let dongle_loop = async {
        loop {
            // (Re)start the controller with the configuration in flash.
            let settings = dongle.flash().can;
            let mut configurator = CanConfigurator::new(
                fdcan.reborrow(),
                can_rx_pin.reborrow(),
                can_tx_pin.reborrow(),
                Irqs,
            );
            if let (Some(prescaler), Some(seg1), Some(seg2), Some(sjw)) = (
                NonZeroU16::new(settings.prescaler),
                NonZeroU8::new(settings.tseg1),
                NonZeroU8::new(settings.tseg2),
                NonZeroU8::new(settings.sjw),
            ) {
                let timing = NominalBitTiming {
                    prescaler,
                    seg1,
                    seg2,
                    sync_jump_width: sjw,
                };
                configurator.set_config(
                    configurator
                        .config()
                        .set_nominal_bit_timing(timing)
                        .set_automatic_retransmit(
                            settings.flags & firmware_proto::remp::CanConfig::FLAG_AUTO_RETX != 0,
                        ),
                );
            }
            let mode = match settings.mode {
                CanMode::Normal => OperatingMode::NormalOperationMode,
                // The controller's restricted mode never sends (beyond ACKs); the core refuses
                // every frame from the host in listen-only mode as well.
                CanMode::ListenOnly => OperatingMode::RestrictedOperationMode,
                CanMode::Loopback => OperatingMode::InternalLoopbackMode,
                CanMode::ExtLoop => OperatingMode::ExternalLoopbackMode,
            };
            let mut can = configurator.start(mode);
            board.can_changed = false;

            let mut packet = [0u8; USB_PACKET];
            while !board.can_changed {
                let deadline = stream
                    .next_due()
                    .map(|due| Instant::from_micros(due.0))
                    .unwrap_or_else(|| Instant::now() + embassy_time::Duration::from_millis(100));
                let happened = select3(
                    usb_rx.read_packet(&mut packet),
                    can.read(),
                    Timer::at(deadline),
                )
                .await;
                let now = Ticks(Instant::now().as_micros());
                match happened {
                    Either3::First(Ok(n)) => {
                        stream.receive(&mut dongle, now, &packet[..n], &mut board);
                    }
                    Either3::First(Err(_)) => {
                        // Unplugged: a new host must authenticate again before it sees the bus, and
                        // half a frame from the old one is no packet (what a power cycle forgets).
                        usb_rx.wait_connection().await;
                        let now = Ticks(Instant::now().as_micros());
                        stream.link_restarted(&mut dongle, now, 0);
                    }
                    Either3::Second(Ok(envelope)) => {
                        if let Some(frame) = core_frame(&envelope.frame) {
                            stream.bus_frames(&mut dongle, now, &[frame], &mut board);
                        }
                    }
                    Either3::Second(Err(_)) => {}
                    Either3::Third(()) => {}
                }
                stream.poll(&mut dongle, now, &mut board);
                for frame in core::mem::take(&mut board.to_bus) {
                    let Some(frame) = can_frame(&frame) else {
                        continue;
                    };
                    // A bus where nobody acknowledges (no other node, a wrong bitrate) never frees
                    // a transmit buffer: the frame is dropped and counted after a short wait, so the
                    // link, the console and a new CAN configuration are still served.
                    match with_timeout(CAN_TX_WAIT, can.write(&frame)).await {
                        Ok(None) => {}
                        // A lower-priority frame was evicted from the controller's queue.
                        Ok(Some(_)) | Err(_) => {
                            board.count_bus_drop();
                            // Reported to the host in BUS_STATUS.
                            dongle.note_lost_to_bus(1);
                        }
                    }
                }
                if let Some(image) = board.to_store.take()
                    && let Err(e) = store_image(&mut flash_driver, &image).await
                {
                    // Tried again at the next change, whatever it is.
                    board.stored = None;
                    board.log(format_args!("flash write failed: {e:?}"));
                }
                // A host that has the port configured but reads nothing must not stall the dongle:
                // what it does not take within the wait is lost with its session, as on an unplug.
                let sent = with_timeout(USB_TX_WAIT, write_all(&mut usb_tx, &board.to_host)).await;
                board.to_host.clear();
                if !matches!(sent, Ok(Ok(()))) {
                    board.count_host_drop();
                }
            }
        }
    };
    join(usb.run(), dongle_loop).await;
}

/// Writes `bytes` as USB packets, ending with a short (or empty) one so the host sees the end.
async fn write_all<'d, D: embassy_usb::driver::Driver<'d>>(
    tx: &mut embassy_usb::class::cdc_acm::Sender<'d, D>,
    bytes: &[u8],
) -> Result<(), EndpointError> {
    if bytes.is_empty() {
        return Ok(());
    }
    for chunk in bytes.chunks(USB_PACKET) {
        tx.write_packet(chunk).await?;
    }
    if bytes.len().is_multiple_of(USB_PACKET) {
        tx.write_packet(&[]).await?;
    }
    Ok(())
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    cortex_m::interrupt::disable();
    // What a probe on the rig reads; then the board starts again rather than hanging.
    rtt_target::rprintln!("PANIC: {}", info);
    cortex_m::peripheral::SCB::sys_reset()
}
