//! Capabilities of the launcher process itself (capabilities(7)).
//!
//! The launcher needs a capability at two moments only: a file capability `cap_net_bind_service`, when
//! the administrator gave the binary one, while it binds host ports; and the full set it holds in its
//! own user namespace while it sets that namespace up. After each moment it drops everything, so the
//! long-running forwarder holds no capability at all, in any namespace.

use caps::CapSet;
pub use caps::Capability;

#[derive(Debug, thiserror::Error)]
pub enum CapsError {
    #[error("cannot drop the {set} capability set: {source}")]
    Drop {
        set: &'static str,
        #[source]
        source: caps::errors::CapsError,
    },
}

/// Empties the bounding set, so that nothing this process execs or clones from now on can regain a
/// capability. Needs CAP_SETPCAP; without it in the permitted set this does nothing, since such a process
/// has nothing to bound.
pub fn drop_bounding() -> Result<(), CapsError> {
    let permitted = caps::read(None, CapSet::Permitted).unwrap_or_default();
    if permitted.contains(&caps::Capability::CAP_SETPCAP) {
        caps::raise(None, CapSet::Effective, caps::Capability::CAP_SETPCAP)
            .and_then(|()| caps::clear(None, CapSet::Bounding))
            .map_err(|source| CapsError::Drop {
                set: "bounding",
                source,
            })?;
    }
    Ok(())
}

/// Empties the ambient, inheritable, effective and permitted sets: once the permitted set is empty no
/// capability can come back short of an exec.
pub fn drop_all() -> Result<(), CapsError> {
    drop_all_except(&[])
}

/// Like [`drop_all`], but keeps each of `keep` in the effective and permitted sets if the process
/// holds it.
///
/// A caller that is uid 0 needs CAP_SETFCAP when it creates its user namespace: since Linux 5.12 the
/// kernel lets a namespace map the parent's uid 0 only if its creator held that capability.
pub fn drop_all_except(keep: &[Capability]) -> Result<(), CapsError> {
    let kept: caps::CapsHashSet = keep
        .iter()
        .copied()
        .filter(|cap| caps::has_cap(None, CapSet::Permitted, *cap).unwrap_or(false))
        .collect();
    for (set, name) in [
        (CapSet::Ambient, "ambient"),
        (CapSet::Inheritable, "inheritable"),
    ] {
        caps::clear(None, set).map_err(|source| CapsError::Drop { set: name, source })?;
    }
    for (set, name) in [
        (CapSet::Effective, "effective"),
        (CapSet::Permitted, "permitted"),
    ] {
        caps::set(None, set, &kept).map_err(|source| CapsError::Drop { set: name, source })?;
    }
    Ok(())
}
