//! PCI device discovery and driver binding through sysfs (`/sys/bus/pci`).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

const SYSFS_PCI: &str = "/sys/bus/pci";

/// Normalise a PCI address to `DDDD:BB:DD.F` (accepts `BB:DD.F`), validating its shape.
pub fn normalize_bdf(s: &str) -> Result<String> {
    let s = s.trim();
    let full = if s.matches(':').count() == 1 {
        format!("0000:{s}")
    } else {
        s.to_string()
    };
    let bad = || Error::BadAddress { bdf: s.to_string() };
    let (dom, rest) = full.split_once(':').ok_or_else(bad)?;
    let (bus, rest) = rest.split_once(':').ok_or_else(bad)?;
    let (dev, func) = rest.split_once('.').ok_or_else(bad)?;
    let hex = |x: &str, n: usize| x.len() == n && x.chars().all(|c| c.is_ascii_hexdigit());
    if !(hex(dom, 4)
        && hex(bus, 2)
        && hex(dev, 2)
        && func.len() == 1
        && matches!(func.as_bytes()[0], b'0'..=b'7'))
    {
        return Err(bad());
    }
    let d = u8::from_str_radix(dev, 16).map_err(|_| bad())?;
    if d > 0x1f {
        return Err(bad());
    }
    Ok(full.to_ascii_lowercase())
}

/// sysfs directory of a device, checking that it exists.
pub fn device_dir(bdf: &str) -> Result<PathBuf> {
    let p = Path::new(SYSFS_PCI).join("devices").join(bdf);
    if p.exists() {
        Ok(p)
    } else {
        Err(Error::NoSuchDevice {
            bdf: bdf.to_string(),
        })
    }
}

fn link_name(p: &Path) -> Option<String> {
    fs::read_link(p)
        .ok()
        .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
}

/// The driver the device is bound to, if any.
pub fn current_driver(bdf: &str) -> Result<Option<String>> {
    Ok(link_name(&device_dir(bdf)?.join("driver")))
}

/// The device's IOMMU group number, if it has one.
pub fn iommu_group(bdf: &str) -> Result<Option<u32>> {
    Ok(link_name(&device_dir(bdf)?.join("iommu_group")).and_then(|n| n.parse().ok()))
}

/// Other devices in the same IOMMU group and their drivers.
pub fn group_members(group: u32) -> Vec<(String, Option<String>)> {
    let dir = format!("/sys/kernel/iommu_groups/{group}/devices");
    let Ok(rd) = fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok())
        .map(|e| {
            let bdf = e.file_name().to_string_lossy().into_owned();
            let drv = current_driver(&bdf).ok().flatten();
            (bdf, drv)
        })
        .collect()
}

fn read_hex(p: &Path) -> Option<u32> {
    let s = fs::read_to_string(p).ok()?;
    u32::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok()
}

/// Vendor, device and class codes.
pub fn ids(bdf: &str) -> Result<(u16, u16, u32)> {
    let d = device_dir(bdf)?;
    Ok((
        read_hex(&d.join("vendor")).unwrap_or(0) as u16,
        read_hex(&d.join("device")).unwrap_or(0) as u16,
        read_hex(&d.join("class")).unwrap_or(0),
    ))
}

fn write_sysfs(p: &Path, v: &str, bdf: &str) -> Result<()> {
    fs::write(p, v).map_err(|e| match e.kind() {
        io::ErrorKind::PermissionDenied => Error::Permission {
            bdf: bdf.into(),
            path: p.display().to_string(),
        },
        _ => Error::io(format!("writing {v:?} to {}", p.display()), e),
    })
}

fn state_file(bdf: &str) -> PathBuf {
    let dir = if Path::new("/run").is_dir() {
        "/run/nvmf-p2p"
    } else {
        "/tmp/nvmf-p2p"
    };
    Path::new(dir).join(format!("{bdf}.driver"))
}

/// Result of a bind/unbind.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BindOutcome {
    pub bdf: String,
    pub previous_driver: Option<String>,
    pub driver: Option<String>,
    pub iommu_group: Option<u32>,
    /// The VFIO group device node, after binding to vfio-pci.
    pub vfio_group_path: Option<String>,
    pub changed: bool,
}

/// Bind `bdf` to vfio-pci (driver_override, unbind, drivers_probe), remembering the
/// previous driver for [`unbind_from_vfio`].
pub fn bind_vfio(bdf: &str) -> Result<BindOutcome> {
    let bdf = normalize_bdf(bdf)?;
    let dir = device_dir(&bdf)?;
    let prev = current_driver(&bdf)?;
    let group = iommu_group(&bdf)?;
    if prev.as_deref() == Some("vfio-pci") {
        return Ok(BindOutcome {
            vfio_group_path: group.map(|g| format!("/dev/vfio/{g}")),
            bdf,
            previous_driver: prev.clone(),
            driver: prev,
            iommu_group: group,
            changed: false,
        });
    }
    let group = group.ok_or_else(|| Error::NoIommuGroup { bdf: bdf.clone() })?;
    if !Path::new(SYSFS_PCI).join("drivers/vfio-pci").exists() {
        let _ = std::process::Command::new("modprobe")
            .arg("vfio-pci")
            .status();
        if !Path::new(SYSFS_PCI).join("drivers/vfio-pci").exists() {
            return Err(Error::Unsupported {
                what: "the vfio-pci driver (modprobe vfio-pci failed)".into(),
            });
        }
    }
    write_sysfs(&dir.join("driver_override"), "vfio-pci", &bdf)?;
    if let Some(d) = &prev {
        let sf = state_file(&bdf);
        if let Some(parent) = sf.parent() {
            let _ = fs::create_dir_all(parent);
        }
        let _ = fs::write(&sf, d);
        write_sysfs(&dir.join("driver/unbind"), &bdf, &bdf)?;
    }
    write_sysfs(&Path::new(SYSFS_PCI).join("drivers_probe"), &bdf, &bdf)?;
    let now = current_driver(&bdf)?;
    if now.as_deref() != Some("vfio-pci") {
        return Err(Error::Unsupported {
            what: format!(
                "binding {bdf} to vfio-pci (it is now bound to {})",
                now.as_deref().unwrap_or("nothing")
            ),
        });
    }
    Ok(BindOutcome {
        bdf,
        previous_driver: prev,
        driver: now,
        iommu_group: Some(group),
        vfio_group_path: Some(format!("/dev/vfio/{group}")),
        changed: true,
    })
}

/// Give `bdf` back to `driver`, or to the driver it had before [`bind_vfio`], or to
/// whatever the kernel picks.
pub fn unbind_from_vfio(bdf: &str, driver: Option<&str>) -> Result<BindOutcome> {
    let bdf = normalize_bdf(bdf)?;
    let dir = device_dir(&bdf)?;
    let prev = current_driver(&bdf)?;
    let remembered = fs::read_to_string(state_file(&bdf))
        .ok()
        .map(|s| s.trim().to_string());
    let target = driver.map(str::to_string).or(remembered);
    if let Some(t) = &target {
        if prev.as_deref() == Some(t.as_str()) {
            return Ok(BindOutcome {
                bdf,
                previous_driver: prev.clone(),
                driver: prev,
                iommu_group: iommu_group_opt(&dir),
                vfio_group_path: None,
                changed: false,
            });
        }
    }
    if prev.is_some() {
        write_sysfs(&dir.join("driver/unbind"), &bdf, &bdf)?;
    }
    write_sysfs(
        &dir.join("driver_override"),
        target.as_deref().unwrap_or("\n"),
        &bdf,
    )?;
    write_sysfs(&Path::new(SYSFS_PCI).join("drivers_probe"), &bdf, &bdf)?;
    write_sysfs(&dir.join("driver_override"), "\n", &bdf)?;
    let _ = fs::remove_file(state_file(&bdf));
    let now = current_driver(&bdf)?;
    Ok(BindOutcome {
        bdf,
        previous_driver: prev,
        driver: now,
        iommu_group: iommu_group_opt(&dir),
        vfio_group_path: None,
        changed: true,
    })
}

fn iommu_group_opt(dir: &Path) -> Option<u32> {
    link_name(&dir.join("iommu_group")).and_then(|n| n.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bdf_parsing() {
        assert_eq!(normalize_bdf("00:03.0").unwrap(), "0000:00:03.0");
        assert_eq!(normalize_bdf("0000:AF:1f.7").unwrap(), "0000:af:1f.7");
        for bad in [
            "",
            "0000:00:03",
            "0000:00:20.0",
            "0000:00:03.8",
            "zz:00.0",
            "0000:00:03.0:1",
            "../../etc",
        ] {
            assert!(
                matches!(normalize_bdf(bad), Err(Error::BadAddress { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn missing_device_is_a_clear_error() {
        let e = device_dir("0000:ee:1f.7").unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
        assert!(matches!(
            bind_vfio("0000:ee:1f.7"),
            Err(Error::NoSuchDevice { .. })
        ));
    }
}
