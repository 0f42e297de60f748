//! Log pages passed through from the NVMe controllers behind a subsystem's namespaces:
//! SMART / Health Information (02h) and Error Information (01h).
//!
//! A controller of ours may serve namespaces of several devices (and several namespaces
//! of one device); each device is read once ([`DeviceRef::key`]) and the pages are
//! combined for the whole controller:
//! - SMART: critical warnings and the endurance group summary ORed; composite temperature
//!   and each temperature sensor the hottest (0 = no sensor is ignored); available spare
//!   the lowest, its threshold and percentage used the highest (the worst device decides);
//!   every counter (data units, commands, busy time, power cycles and hours, unsafe
//!   shutdowns, media errors, error log entries, temperature times and transitions)
//!   summed, saturating.
//! - Error Information: the devices' entries with a nonzero error count, device by device,
//!   each entry's NSID mapped to the subsystem's namespace of that device namespace
//!   (FFFFFFFFh when none is) and its SQID/CID set to FFFFh (the device's queues are not
//!   the host's).
//!
//! Linux nvmet does not pass a device's SMART log through (FACTS.md, "Linux nvmet's
//! SMART and error logs"); ours does, because a `vfio:` or `spdk:` namespace owns its
//! device and nobody else can read it.

use std::borrow::Borrow;
use std::collections::HashSet;

use nvme::spec::{log, ErrorLogEntry, SmartLog, U128, U16, U32};
use zerocopy::FromBytes;

use super::{Namespace, Subsystem};
use crate::backend::DeviceRef;

/// The distinct devices behind `namespaces` with the namespaces they back, in namespace
/// order.
fn devices<N: Borrow<Namespace>>(namespaces: &[N]) -> Vec<(DeviceRef, &Namespace)> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for ns in namespaces {
        let ns = ns.borrow();
        if let Some(d) = ns.backend.device() {
            if seen.insert(d.key) {
                out.push((d, ns));
            }
        }
    }
    out
}

/// The combined SMART / Health log of the devices behind the namespaces of `sub`, or
/// `None` when no namespace has a device (or no device answered: each failure is logged).
pub(crate) fn smart(sub: &Subsystem) -> Option<SmartLog> {
    let held = sub.namespaces();
    let namespaces: Vec<&Namespace> = held.iter().map(|n| -> &Namespace { n }).collect();
    let mut acc: Option<SmartLog> = None;
    for (dev, ns) in devices(&namespaces) {
        let page = ns
            .backend
            .device_log_page(log::SMART, size_of::<SmartLog>())
            .and_then(|v| {
                SmartLog::read_from_bytes(&v).map_err(|_| crate::Error::BackendUnavailable {
                    kind: "device log",
                    reason: "short SMART log",
                })
            });
        match page {
            Ok(s) => match &mut acc {
                None => acc = Some(s),
                Some(a) => merge_smart(a, &s),
            },
            Err(e) => tracing::warn!(device = %dev.name, error = %e, "SMART log of the device"),
        }
    }
    acc
}

/// Adds device log `b` to the combined log `a` (see the module comment).
pub(crate) fn merge_smart(a: &mut SmartLog, b: &SmartLog) {
    fn sum(x: &mut U128, y: U128) {
        *x = U128::new(x.get().saturating_add(y.get()));
    }
    fn sum32(x: &mut U32, y: U32) {
        *x = U32::new(x.get().saturating_add(y.get()));
    }
    fn hottest(x: &mut U16, y: U16) {
        if y.get() != 0 && (x.get() == 0 || y.get() > x.get()) {
            *x = y;
        }
    }
    a.critical_warning |= b.critical_warning;
    a.endurance_group_critical |= b.endurance_group_critical;
    hottest(&mut a.temperature, b.temperature);
    for (x, y) in a.temp_sensor.iter_mut().zip(b.temp_sensor) {
        hottest(x, y);
    }
    a.avail_spare = a.avail_spare.min(b.avail_spare);
    a.spare_thresh = a.spare_thresh.max(b.spare_thresh);
    a.percent_used = a.percent_used.max(b.percent_used);
    sum(&mut a.data_units_read, b.data_units_read);
    sum(&mut a.data_units_written, b.data_units_written);
    sum(&mut a.host_read_commands, b.host_read_commands);
    sum(&mut a.host_write_commands, b.host_write_commands);
    sum(&mut a.controller_busy_time, b.controller_busy_time);
    sum(&mut a.power_cycles, b.power_cycles);
    sum(&mut a.power_on_hours, b.power_on_hours);
    sum(&mut a.unsafe_shutdowns, b.unsafe_shutdowns);
    sum(&mut a.media_errors, b.media_errors);
    sum(&mut a.num_error_log_entries, b.num_error_log_entries);
    sum32(&mut a.warning_temp_time, b.warning_temp_time);
    sum32(&mut a.critical_temp_time, b.critical_temp_time);
    sum32(&mut a.thermal_mgmt_t1_count, b.thermal_mgmt_t1_count);
    sum32(&mut a.thermal_mgmt_t2_count, b.thermal_mgmt_t2_count);
    sum32(&mut a.thermal_mgmt_t1_time, b.thermal_mgmt_t1_time);
    sum32(&mut a.thermal_mgmt_t2_time, b.thermal_mgmt_t2_time);
}

/// Up to `max` entries of the Error Information logs of the devices behind the namespaces
/// of `sub` (see the module comment).
pub(crate) fn errors(sub: &Subsystem, max: usize) -> Vec<ErrorLogEntry> {
    let held = sub.namespaces();
    let namespaces: Vec<&Namespace> = held.iter().map(|n| -> &Namespace { n }).collect();
    let namespaces = &namespaces[..];
    let mut out = Vec::new();
    if max == 0 {
        return out;
    }
    let len = max.min(128) * size_of::<ErrorLogEntry>();
    for (dev, ns) in devices(namespaces) {
        if out.len() >= max {
            break;
        }
        let page = match ns.backend.device_log_page(log::ERROR, len) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(device = %dev.name, error = %e, "error log of the device");
                continue;
            }
        };
        for chunk in page.chunks_exact(size_of::<ErrorLogEntry>()) {
            let Ok(mut e) = ErrorLogEntry::read_from_bytes(chunk) else {
                continue;
            };
            if e.error_count.get() == 0 || out.len() >= max {
                continue;
            }
            e.nsid = U32::new(host_nsid(namespaces, &dev, e.nsid.get()));
            e.sqid = U16::new(0xffff);
            e.cid = U16::new(0xffff);
            out.push(e);
        }
    }
    out
}

/// The subsystem's namespace id for namespace `dev_nsid` of device `dev`; FFFFFFFFh when
/// the subsystem does not serve it (or the entry is not about one namespace).
fn host_nsid<N: Borrow<Namespace>>(namespaces: &[N], dev: &DeviceRef, dev_nsid: u32) -> u32 {
    namespaces
        .iter()
        .map(|ns| ns.borrow())
        .find(|ns| {
            ns.backend
                .device()
                .is_some_and(|d| d.key == dev.key && d.nsid == dev_nsid)
        })
        .map_or(u32::MAX, |ns| ns.nsid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smart(temp: u16, cw: u8, spare: u8, reads: u128) -> SmartLog {
        let mut s = SmartLog::zeroed();
        s.temperature = U16::new(temp);
        s.critical_warning = cw;
        s.avail_spare = spare;
        s.spare_thresh = 10;
        s.host_read_commands = U128::new(reads);
        s.power_on_hours = U128::new(5);
        s.temp_sensor[0] = U16::new(temp);
        s
    }

    #[test]
    fn merge_takes_the_worst_and_sums_counters() {
        let mut a = smart(310, 0b001, 90, 7);
        let mut b = smart(330, 0b100, 95, 5);
        b.temp_sensor[0] = U16::new(0); // no sensor: ignored
        b.temp_sensor[1] = U16::new(320);
        b.spare_thresh = 20;
        b.percent_used = 3;
        b.host_read_commands = U128::new(u128::MAX);
        merge_smart(&mut a, &b);
        assert_eq!(a.temperature.get(), 330);
        assert_eq!(a.critical_warning, 0b101);
        assert_eq!((a.avail_spare, a.spare_thresh, a.percent_used), (90, 20, 3));
        assert_eq!(a.host_read_commands.get(), u128::MAX, "saturates");
        assert_eq!(a.power_on_hours.get(), 10);
        assert_eq!(a.temp_sensor[0].get(), 310);
        assert_eq!(a.temp_sensor[1].get(), 320);
    }
}
