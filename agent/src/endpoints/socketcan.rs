//! SocketCAN (Linux only): a CAN interface of the kernel, `can0` or `vcan0`, through the `socketcan`
//! crate's tokio sockets.
//!
//! The socket is a CAN FD raw socket, so it reads classic and FD frames alike; FD frames can be sent
//! where the interface's MTU is the FD one. Error frames are asked for and turned into the bus status
//! ([`apply_error`]), and the interface's state comes from netlink when the status is asked for. Bit
//! timing belongs to the kernel (`ip link set can0 type can bitrate ...`, as root), so the endpoint
//! cannot set it and says so; remote frames cannot cross a group and are counted as unsupported.

use std::sync::Arc;

use firmware_proto::ext::batch;
use firmware_proto::ids::CanId;
use socketcan::errors::{CanError, ControllerProblems, ErrorCause};
use socketcan::id::FdFlags;
use socketcan::{
    CanAnyFrame, CanDataFrame, CanFdFrame, CanInterface, EmbeddedFrame, ExtendedId, Id,
    SocketOptions, StandardId,
};
use tokio::sync::mpsc;

use super::{
    BusHealth, BusState, Driver, EndpointError, EndpointInfo, EndpointKind, Plumbing, Request,
    Shared, bump,
};
use crate::frame::Frame;

/// A frame read from a SocketCAN socket, sorted.
#[derive(Debug)]
pub enum FromBus {
    Frame(Frame),
    /// An error frame: the controller's report of a bus event.
    Error(CanError),
    /// A remote frame, which cannot cross a group.
    Remote,
}

fn can_id(id: Id) -> Option<CanId> {
    match id {
        Id::Standard(s) => CanId::standard(s.as_raw()).ok(),
        Id::Extended(e) => CanId::extended(e.as_raw()).ok(),
    }
}

fn socketcan_id(id: CanId) -> Option<Id> {
    if id.is_extended() {
        ExtendedId::new(id.raw()).map(Id::Extended)
    } else {
        StandardId::new(u16::try_from(id.raw()).ok()?).map(Id::Standard)
    }
}

/// Sorts a frame read from the kernel.
pub fn from_socketcan(frame: CanAnyFrame) -> FromBus {
    match frame {
        CanAnyFrame::Normal(f) => {
            match can_id(f.id()).and_then(|id| Frame::classic(id, f.data())) {
                Some(frame) => FromBus::Frame(frame),
                None => FromBus::Remote,
            }
        }
        CanAnyFrame::Fd(f) => {
            let mut flags = batch::flags::FD;
            if f.is_brs() {
                flags |= batch::flags::BRS;
            }
            if f.is_esi() {
                flags |= batch::flags::ESI;
            }
            match can_id(f.id()).and_then(|id| Frame::with_flags(id, flags, f.data())) {
                Some(frame) => FromBus::Frame(frame),
                None => FromBus::Remote,
            }
        }
        CanAnyFrame::Remote(_) => FromBus::Remote,
        CanAnyFrame::Error(e) => FromBus::Error(e.into_error()),
    }
}

/// The kernel's form of `frame`; `None` for a frame the kernel cannot carry (an FD length that is no
/// CAN FD length, which [`super::check_frame`] keeps out beforehand).
pub fn to_socketcan(frame: &Frame) -> Option<CanAnyFrame> {
    let id = socketcan_id(frame.id)?;
    if frame.is_fd() {
        let len = u8::try_from(frame.data().len()).ok()?;
        batch::len_to_dlc(len)?;
        let mut flags = FdFlags::empty();
        if frame.fd_flags & batch::flags::BRS != 0 {
            flags |= FdFlags::BRS;
        }
        if frame.fd_flags & batch::flags::ESI != 0 {
            flags |= FdFlags::ESI;
        }
        CanFdFrame::with_flags(id, frame.data(), flags).map(CanAnyFrame::Fd)
    } else {
        CanDataFrame::new(id, frame.data()).map(CanAnyFrame::Normal)
    }
}

/// Reads one error frame into the bus status.
pub fn apply_error(error: &CanError, health: &mut BusHealth) {
    health.error_frames += 1;
    health.last_error = Some(error.to_string());
    for cause in error.causes() {
        match cause {
            ErrorCause::BusOff => health.state = Some(BusState::BusOff),
            ErrorCause::Restarted => health.state = Some(BusState::ErrorActive),
            ErrorCause::Counters { tx, rx } => {
                health.tec = Some(*tx);
                health.rec = Some(*rx);
            }
            ErrorCause::Controller(problems) => {
                if problems.contains(ControllerProblems::ACTIVE) {
                    health.state = Some(BusState::ErrorActive);
                }
                if problems
                    .intersects(ControllerProblems::RX_PASSIVE | ControllerProblems::TX_PASSIVE)
                {
                    health.state = Some(BusState::ErrorPassive);
                } else if problems
                    .intersects(ControllerProblems::RX_WARNING | ControllerProblems::TX_WARNING)
                {
                    health.state = Some(BusState::ErrorWarning);
                }
                if problems
                    .intersects(ControllerProblems::RX_OVERFLOW | ControllerProblems::TX_OVERFLOW)
                {
                    health.overflows += 1;
                }
            }
            _ => {}
        }
    }
}

/// The interface's state from netlink, as the bus status has it.
fn interface_state(interface: &str) -> Option<BusState> {
    let iface = CanInterface::open(interface).ok()?;
    let details = iface.details().ok()?;
    if !details.is_up {
        return Some(BusState::Stopped);
    }
    use socketcan::nl::CanState;
    match iface.state().ok()?? {
        CanState::ErrorActive => Some(BusState::ErrorActive),
        CanState::ErrorWarning => Some(BusState::ErrorWarning),
        CanState::ErrorPassive => Some(BusState::ErrorPassive),
        CanState::BusOff => Some(BusState::BusOff),
        CanState::Stopped | CanState::Sleeping => Some(BusState::Stopped),
    }
}

fn socket_error(interface: &str, e: &std::io::Error) -> EndpointError {
    let detail = match e.raw_os_error() {
        Some(97) => "this kernel has no SocketCAN (address family not supported): load the can and can_raw modules".to_string(),
        Some(19) => "no such interface (ip link show, or create a virtual one: ip link add dev vcan0 type vcan)".to_string(),
        _ => e.to_string(),
    };
    EndpointError::SocketCan {
        interface: interface.to_string(),
        detail,
    }
}

/// Opens a CAN FD raw socket on `interface`, with every error frame reported.
pub(crate) async fn open(interface: &str, plumbing: Plumbing) -> Result<Driver, EndpointError> {
    let socket =
        socketcan::tokio::CanFdSocket::open(interface).map_err(|e| socket_error(interface, &e))?;
    socket
        .set_error_filter_accept_all()
        .map_err(|e| socket_error(interface, &e))?;
    // Netlink tells whether the interface is up and carries FD; a failure there leaves the socket usable.
    let details = CanInterface::open(interface).and_then(|i| i.details()).ok();
    if details.as_ref().is_some_and(|d| !d.is_up) {
        return Err(EndpointError::SocketCan {
            interface: interface.to_string(),
            detail: format!(
                "the interface is down: as root run `ip link set {interface} up type can bitrate 500000` (or `ip link set {interface} up` for a vcan)"
            ),
        });
    }
    let fd = details
        .as_ref()
        .and_then(|d| d.mtu)
        .is_some_and(|mtu| matches!(mtu, socketcan::nl::Mtu::Fd));
    let bitrate = details
        .as_ref()
        .and_then(|d| d.can.bit_timing.as_ref())
        .map(|t| t.bitrate)
        .filter(|b| *b > 0);
    let data_bitrate = details
        .as_ref()
        .and_then(|d| d.can.data_bit_timing.as_ref())
        .map(|t| t.bitrate)
        .filter(|b| *b > 0);
    let state = interface_state(interface);
    plumbing.shared.update_health(|h| h.state = state);
    let info = EndpointInfo {
        kind: EndpointKind::SocketCan,
        identity: format!("socketcan:{interface}"),
        location: interface.to_string(),
        can_set_timing: false,
        fd,
        version: None,
        bitrate,
        data_bitrate,
    };
    let interface = interface.to_string();
    Ok(Driver {
        info,
        run: Box::pin(serve(socket, interface, plumbing)),
    })
}

async fn serve(socket: socketcan::tokio::CanFdSocket, interface: String, plumbing: Plumbing) {
    let Plumbing {
        frames,
        shared,
        mut requests,
    } = plumbing;
    loop {
        tokio::select! {
            read = socket.read_frame() => match read {
                Ok(frame) => receive(frame, &frames, &shared),
                Err(e) => {
                    // ENETDOWN when the interface goes down, ENODEV when it goes away.
                    tracing::warn!(%interface, error = %e, "the SocketCAN interface cannot be read");
                    return;
                }
            },
            request = requests.recv() => match request {
                None => return,
                Some(Request::Send(batch)) => {
                    for frame in &batch {
                        let written = match to_socketcan(frame) {
                            Some(f) => socket.write_frame(&f).await.is_ok(),
                            None => false,
                        };
                        // ENOBUFS (a full transmit queue) and EINVAL (FD on a classic interface)
                        // lose the frame; the group's other side sees it counted.
                        bump(if written { &shared.stats.frames_out } else { &shared.stats.frames_out_lost }, 1);
                    }
                }
                Some(Request::Configure(_, reply)) => {
                    let _ = reply.send(Err(EndpointError::TimingNotSettable {
                        identity: format!("socketcan:{interface}"),
                        what: "the bit timing",
                        how: "a SocketCAN interface takes it from the kernel (ip link)".into(),
                    }));
                }
                Some(Request::Status(reply)) => {
                    let name = interface.clone();
                    let state = tokio::task::spawn_blocking(move || interface_state(&name))
                        .await
                        .ok()
                        .flatten();
                    if state.is_some() {
                        shared.update_health(|h| h.state = state);
                    }
                    let _ = reply.send(shared.health.lock().unwrap().clone());
                }
            },
        }
    }
}

fn receive(frame: CanAnyFrame, frames: &mpsc::Sender<Frame>, shared: &Arc<Shared>) {
    match from_socketcan(frame) {
        FromBus::Frame(mut f) => {
            f.timestamp_us = shared.now_us();
            shared.deliver(frames, f);
        }
        FromBus::Error(e) => {
            tracing::debug!(error = %e, "CAN error frame");
            shared.update_health(|h| apply_error(&e, h));
        }
        FromBus::Remote => bump(&shared.stats.unsupported, 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use socketcan::{CanErrorFrame, CanRemoteFrame};

    fn round_trip(frame: Frame) {
        let kernel = to_socketcan(&frame).expect("convertible");
        match from_socketcan(kernel) {
            FromBus::Frame(back) => assert_eq!(back, frame),
            other => panic!("{frame:?} came back as {other:?}"),
        }
    }

    #[test]
    fn classic_and_fd_frames_convert_both_ways() {
        round_trip(Frame::classic(CanId::standard(0x7df).unwrap(), &[2, 1, 0x0d]).unwrap());
        round_trip(Frame::classic(CanId::extended(0x18db_33f1).unwrap(), &[]).unwrap());
        round_trip(Frame::classic(CanId::standard(0).unwrap(), &[0xff; 8]).unwrap());
        round_trip(
            Frame::with_flags(CanId::standard(0x123).unwrap(), batch::flags::FD, &[5; 48]).unwrap(),
        );
        round_trip(
            Frame::with_flags(
                CanId::extended(0x1fff_ffff).unwrap(),
                batch::flags::FD | batch::flags::BRS | batch::flags::ESI,
                &[7; 64],
            )
            .unwrap(),
        );
        // A small id stays standard or extended as it was: the kernel keeps the format bit.
        let ext_small = Frame::classic(CanId::extended(0x10).unwrap(), &[1]).unwrap();
        let CanAnyFrame::Normal(k) = to_socketcan(&ext_small).unwrap() else {
            panic!()
        };
        assert!(k.is_extended());
        round_trip(ext_small);
    }

    #[test]
    fn frames_the_kernel_cannot_carry_are_refused() {
        let odd =
            Frame::with_flags(CanId::standard(1).unwrap(), batch::flags::FD, &[0; 13]).unwrap();
        assert!(to_socketcan(&odd).is_none());
        let long = Frame::with_flags(CanId::standard(1).unwrap(), 0, &[0; 9]).unwrap();
        assert!(to_socketcan(&long).is_none());
    }

    #[test]
    fn remote_frames_are_sorted_out() {
        let rtr = CanRemoteFrame::new_remote(StandardId::new(0x123).unwrap(), 2).unwrap();
        assert!(matches!(
            from_socketcan(CanAnyFrame::Remote(rtr)),
            FromBus::Remote
        ));
    }

    fn error(cause: ErrorCause) -> CanError {
        match from_socketcan(CanAnyFrame::Error(CanErrorFrame::from(cause))) {
            FromBus::Error(e) => e,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn error_frames_become_bus_status() {
        let mut h = BusHealth::default();
        apply_error(
            &error(ErrorCause::Controller(ControllerProblems::TX_WARNING)),
            &mut h,
        );
        assert_eq!(h.state, Some(BusState::ErrorWarning));
        apply_error(
            &error(ErrorCause::Controller(
                ControllerProblems::RX_PASSIVE | ControllerProblems::RX_OVERFLOW,
            )),
            &mut h,
        );
        assert_eq!(h.state, Some(BusState::ErrorPassive));
        assert_eq!(h.overflows, 1);
        apply_error(&error(ErrorCause::Counters { tx: 200, rx: 12 }), &mut h);
        assert_eq!((h.tec, h.rec), (Some(200), Some(12)));
        apply_error(&error(ErrorCause::BusOff), &mut h);
        assert_eq!(h.state, Some(BusState::BusOff));
        assert!(h.last_error.as_deref().unwrap().contains("bus off"));
        apply_error(&error(ErrorCause::Restarted), &mut h);
        assert_eq!(h.state, Some(BusState::ErrorActive));
        assert_eq!(h.error_frames, 5);
        assert_eq!(
            h.state.unwrap().to_remp(),
            Some(firmware_proto::ext::BusState::ErrorActive)
        );
    }

    #[tokio::test]
    async fn opening_without_socketcan_is_a_clear_error() {
        // This machine's kernel has no AF_CAN; where it has one, vcan-less `nosuchcan0` is missing.
        let (frames, _rx) = mpsc::channel(1);
        let (_tx, requests) = mpsc::channel(1);
        let plumbing = Plumbing {
            frames,
            shared: Arc::new(Shared::new()),
            requests,
        };
        let err = open("nosuchcan0", plumbing)
            .await
            .err()
            .expect("no such interface");
        let text = err.to_string();
        assert!(
            text.contains("no SocketCAN") || text.contains("no such interface"),
            "{text}"
        );
    }

    /// Both directions through a vcan interface: `ip link add dev vcan0 type vcan && ip link set vcan0 up`.
    #[tokio::test]
    #[cfg_attr(
        not(feature = "vcan-tests"),
        ignore = "needs a vcan interface: scripts/test turns these on (feature vcan-tests) where it can create vcan0"
    )]
    async fn frames_cross_a_vcan_interface_both_ways() {
        use crate::endpoints::{CanEndpoint, EndpointOptions, EndpointSpec};
        let spec: EndpointSpec = "socketcan:vcan0".parse().unwrap();
        let endpoint = CanEndpoint::open(&spec, &EndpointOptions::default())
            .await
            .unwrap();
        let mut frames = endpoint.take_frames().unwrap();
        let peer = socketcan::tokio::CanFdSocket::open("vcan0").unwrap();
        let from_tool =
            Frame::classic(CanId::standard(0x7e8).unwrap(), &[3, 0x41, 0x0d, 0x32]).unwrap();
        peer.write_frame(&to_socketcan(&from_tool).unwrap())
            .await
            .unwrap();
        let got = tokio::time::timeout(std::time::Duration::from_secs(2), frames.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((got.id, got.data()), (from_tool.id, from_tool.data()));
        let from_group = Frame::classic(CanId::standard(0x7df).unwrap(), &[2, 1, 0x0d]).unwrap();
        endpoint.send_frames(&[from_group]).await.unwrap();
        let seen = tokio::time::timeout(std::time::Duration::from_secs(2), peer.read_frame())
            .await
            .unwrap()
            .unwrap();
        match from_socketcan(seen) {
            FromBus::Frame(f) => assert_eq!((f.id, f.data()), (from_group.id, from_group.data())),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            endpoint
                .configure(&control_proto::CanSettings::derived(
                    500_000,
                    875,
                    firmware_proto::remp::CanMode::Normal
                ))
                .await,
            Err(EndpointError::TimingNotSettable { .. })
        ));
    }

    /// An error frame injected on a vcan interface reaches the bus status.
    #[tokio::test]
    #[cfg_attr(
        not(feature = "vcan-tests"),
        ignore = "needs a vcan interface: scripts/test turns these on (feature vcan-tests) where it can create vcan0"
    )]
    async fn error_frames_on_vcan_reach_the_bus_status() {
        use crate::endpoints::{CanEndpoint, EndpointOptions, EndpointSpec};
        let spec: EndpointSpec = "socketcan:vcan0".parse().unwrap();
        let endpoint = CanEndpoint::open(&spec, &EndpointOptions::default())
            .await
            .unwrap();
        let peer = socketcan::tokio::CanSocket::open("vcan0").unwrap();
        peer.write_frame(socketcan::CanFrame::Error(CanErrorFrame::from(
            ErrorCause::BusOff,
        )))
        .await
        .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert_eq!(endpoint.health().state, Some(BusState::BusOff));
    }
}
