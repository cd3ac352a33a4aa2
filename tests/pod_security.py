"""The Pod Security Standards' "baseline" and "restricted" profiles as checks on a pod spec.

Written from the Kubernetes documentation ("Pod Security Standards",
kubernetes.io/docs/concepts/security/pod-security-standards/, policies as of v1.30+), one
function per control, each naming the field it refuses. "restricted" includes "baseline".
Only what a pod template can carry is checked; the AppArmor annotation of old clusters and
Windows are read too, as the documentation lists them.
"""

from __future__ import annotations

from typing import Any

# Baseline: capabilities a container may add beyond the runtime's defaults.
BASELINE_CAPABILITIES = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL",
                         "MKNOD", "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID",
                         "SYS_CHROOT"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range",
                "net.ipv4.ip_unprivileged_port_start", "net.ipv4.tcp_syncookies",
                "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout",
                "net.ipv4.tcp_keepalive_intvl", "net.ipv4.tcp_keepalive_probes"}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t",
                 "container_engine_t"}
# Restricted: the only volume types allowed.
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                      "persistentVolumeClaim", "projected", "secret"}
VOLUME_META = {"name"}


def _containers(pod: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for kind in ("initContainers", "containers", "ephemeralContainers"):
        for i, c in enumerate(pod.get(kind) or []):
            out.append((f"{kind}[{c.get('name', i)}]", c))
    return out


def _sc(obj: dict[str, Any]) -> dict[str, Any]:
    return obj.get("securityContext") or {}


def baseline(pod: dict[str, Any], annotations: dict[str, str] | None = None) -> list[str]:
    """What "baseline" refuses in ``pod`` (a PodSpec), one line per field."""
    bad: list[str] = []
    psc = _sc(pod)
    containers = _containers(pod)
    # HostProcess
    if (psc.get("windowsOptions") or {}).get("hostProcess"):
        bad.append("securityContext.windowsOptions.hostProcess")
    # Host namespaces
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            bad.append(key)
    for where, c in containers:
        sc = _sc(c)
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            bad.append(f"{where}.securityContext.windowsOptions.hostProcess")
        # Privileged containers
        if sc.get("privileged"):
            bad.append(f"{where}.securityContext.privileged")
        # Capabilities
        added = set((sc.get("capabilities") or {}).get("add") or []) - BASELINE_CAPABILITIES
        if added:
            bad.append(f"{where}.securityContext.capabilities.add: {sorted(added)}")
        # Host ports
        for port in c.get("ports") or []:
            if port.get("hostPort"):
                bad.append(f"{where}.ports[].hostPort")
        # /proc mount type
        if sc.get("procMount") not in (None, "Default"):
            bad.append(f"{where}.securityContext.procMount")
    # HostPath volumes
    for v in pod.get("volumes") or []:
        if "hostPath" in v:
            bad.append(f"volumes[{v.get('name')}].hostPath")
    # AppArmor, SELinux, seccomp: on the pod and on each container
    for where, sc in [("securityContext", psc)] + [
            (f"{w}.securityContext", _sc(c)) for w, c in containers]:
        if (sc.get("appArmorProfile") or {}).get("type") not in (None, "RuntimeDefault",
                                                                "Localhost"):
            bad.append(f"{where}.appArmorProfile.type")
        se = sc.get("seLinuxOptions") or {}
        if se.get("type", "") not in SELINUX_TYPES:
            bad.append(f"{where}.seLinuxOptions.type")
        if se.get("user") or se.get("role"):
            bad.append(f"{where}.seLinuxOptions.user/role")
        if (sc.get("seccompProfile") or {}).get("type") == "Unconfined":
            bad.append(f"{where}.seccompProfile.type: Unconfined")
    for key, value in (annotations or {}).items():
        if key.startswith("container.apparmor.security.beta.kubernetes.io/") and \
                value != "runtime/default" and not value.startswith("localhost/"):
            bad.append(f"metadata.annotations[{key}]")
    # Sysctls
    for s in psc.get("sysctls") or []:
        if s.get("name") not in SAFE_SYSCTLS:
            bad.append(f"securityContext.sysctls[{s.get('name')}]")
    return bad


def restricted(pod: dict[str, Any], annotations: dict[str, str] | None = None) -> list[str]:
    """What "restricted" refuses in ``pod`` (a PodSpec): baseline's, and its own."""
    bad = baseline(pod, annotations)
    psc = _sc(pod)
    containers = _containers(pod)
    # Volume types
    for v in pod.get("volumes") or []:
        kinds = set(v) - VOLUME_META
        if not kinds <= RESTRICTED_VOLUMES:
            bad.append(f"volumes[{v.get('name')}]: {sorted(kinds - RESTRICTED_VOLUMES)}")
    # Running as non-root: the pod says so and no container says otherwise, or every
    # container says so itself.
    pod_nonroot = psc.get("runAsNonRoot") is True
    for where, c in containers:
        nonroot = _sc(c).get("runAsNonRoot")
        if nonroot is False or (nonroot is None and not pod_nonroot):
            bad.append(f"{where}.securityContext.runAsNonRoot")
    # Running as non-root user: no uid 0 anywhere.
    if psc.get("runAsUser") == 0:
        bad.append("securityContext.runAsUser: 0")
    for where, c in containers:
        if _sc(c).get("runAsUser") == 0:
            bad.append(f"{where}.securityContext.runAsUser: 0")
    # Seccomp: RuntimeDefault or Localhost on the pod, or on every container; a container's
    # own, when set, must be one of those too.
    allowed = ("RuntimeDefault", "Localhost")
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type")
    if pod_seccomp is not None and pod_seccomp not in allowed:
        bad.append(f"securityContext.seccompProfile.type: {pod_seccomp}")
    for where, c in containers:
        own = (_sc(c).get("seccompProfile") or {}).get("type")
        if (own is None and pod_seccomp not in allowed) or (own is not None
                                                             and own not in allowed):
            bad.append(f"{where}.securityContext.seccompProfile.type")
    for where, c in containers:
        sc = _sc(c)
        # Privilege escalation: must be set, to false (Linux containers).
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{where}.securityContext.allowPrivilegeEscalation")
        # Capabilities: drop ALL; add nothing but NET_BIND_SERVICE.
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            bad.append(f"{where}.securityContext.capabilities.drop: ALL")
        extra = set(caps.get("add") or []) - {"NET_BIND_SERVICE"}
        if extra:
            bad.append(f"{where}.securityContext.capabilities.add: {sorted(extra)}")
    return bad
