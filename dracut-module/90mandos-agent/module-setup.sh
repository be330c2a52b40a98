#!/bin/bash
# SPDX-License-Identifier: GPL-3.0-or-later
# dracut module "mandos-agent": our Python password agent (python -m password_agent) in a
# systemd initramfs, answering disk-unlock requests with the password a Mandos server hands out.
# The agent's .path unit starts its service when the first request appears; the agent then stays
# resident (--watch, Type=notify) until switch-root.
#
# Sourced by dracut, not run.  Settings (dracut.conf.d variables, all optional):
#   mandos_agent_keydir="DIR"        the four key files (default: /etc/keys/mandos, then
#                                    /etc/mandos/keys, as upstream's module)
#   mandos_agent_pythonpath="D1:D2"  where to find password_agent, mandos_protocol, gnupg and
#                                    inotify_simple before the package's directory
#                                    /usr/lib/mandos-password-agent (a source tree and a
#                                    virtualenv's site-packages, as the tests use)
#   mandos_agent_zeroconf="no"       leave out Zeroconf browsing (0.2 MB, zstd); the
#                                    agent then needs a server from mandos=connect:ADDRESS:PORT
#                                    or from a drop-in with --connect
# The module includes itself in every initramfs once the key set is there (check() says 0), so
# that after installing the mandos-password-agent package and running mandos-keygen a plain
# "dracut -f" takes the agent along.  Without the keys it is left out with a warning, and the
# build goes on: a package-wide add_dracutmodules+=" mandos-agent " would instead fail every
# build (kernel upgrades too) until mandos-keygen ran, since dracut gives up on a module it was
# asked for that cannot be installed.

# Where the mandos-password-agent package installs the agent's Python packages (ours and those
# Debian lacks or ships too old), and where the initramfs keeps them: the agent's unit puts this
# directory on PYTHONPATH.
_mandos_agent_libdir=/usr/lib/mandos-password-agent

# The directory holding the four key files, or failure.
_mandos_agent_keydir() {
    local dir file
    for dir in ${mandos_agent_keydir:-/etc/keys/mandos /etc/mandos/keys}; do
        for file in pubkey.txt seckey.txt tls-pubkey.pem tls-privkey.pem; do
            [[ -s $dir/$file ]] || continue 2
        done
        printf '%s\n' "$dir"
        return 0
    done
    return 1
}

# Has the host a LUKS volume (any LUKS volume: this does not know which unlock in the
# initramfs)?  Only then does the network have to come up for us (rd.neednet=1); forcing it on a
# host without one would stall its boot.
_mandos_agent_has_luks_volume() {
    local dev
    for dev in "${!host_fs_types[@]}"; do
        [[ ${host_fs_types[$dev]} == crypto_LUKS ]] && return 0
    done
    return 1
}

check() {
    require_binaries /usr/bin/python3 gpg gpg-agent gpgconf || return 1
    if ! _mandos_agent_keydir >/dev/null; then
        dwarning "mandos-agent: no Mandos key set (pubkey.txt, seckey.txt, tls-pubkey.pem," \
                 "tls-privkey.pem) in ${mandos_agent_keydir:-/etc/keys/mandos or /etc/mandos/keys};" \
                 "run mandos-keygen"
        return 1
    fi
    return 0
}

# The network comes from the handler the image has already (network-manager, ...), else from
# systemd-networkd, which the service pulls up.  Not dracut's "network" module: its hooks
# (interface renaming rules before udev, DHCP root parsing) serve network root file systems;
# under a slow CPU its pre-udev hook alone held udev, and so the disk's request, back 0.7 s.
depends() {
    local handler
    for handler in network-manager network-legacy connman network-wicked systemd-networkd; do
        if dracut_module_included "$handler"; then
            echo systemd systemd-ask-password crypt
            return 0
        fi
    done
    echo systemd systemd-ask-password crypt systemd-networkd
    return 0
}

# The shared libraries $1 needs: dracut resolves them only for executables, and extension
# modules and libraries are not (ldd lists the indirect ones too).
_mandos_agent_inst_libs() {
    local lib
    while read -r lib; do
        inst_library "$lib" || return 1
    done < <(ldd "$1" | sed -n 's,.*=> \(/[^ ]*\) .*,\1,p')
}

# The interpreter, the standard library modules the agent uses, and its packages.
_mandos_agent_install_python() {
    local private=$_mandos_agent_libdir list src dst gnutls
    local -a args=() targets=()
    [[ ${mandos_agent_zeroconf:-yes} == no ]] || args+=(--zeroconf)
    # shellcheck disable=SC2086
    if ! list=$(/usr/bin/python3 -I "$moddir/python-files.py" "${args[@]}" "$private" \
                    ${mandos_agent_pythonpath//:/ } "$_mandos_agent_libdir"); then
        derror "mandos-agent: cannot trace the agent's Python modules; is the package" \
               "mandos-password-agent installed (or mandos_agent_pythonpath set)?"
        return 1
    fi
    inst_multiple /usr/bin/python3 "$(readlink -f /usr/bin/python3)" || return 1
    while IFS=$'\t' read -r src dst; do
        inst "$src" "$dst" || return 1
        case $dst in
            *.py) targets+=("$initdir$dst") ;;
            *.so) _mandos_agent_inst_libs "$src" || return 1 ;;
        esac
    done <<< "$list"
    # The binding loads libgnutls.so.30 by its soname, through the initramfs's ld.so.cache
    # (ctypes.util.find_library would need ldconfig or gcc, which the initramfs lacks).
    gnutls=$(ldconfig -p | sed -n 's,.*libgnutls\.so\.30 .*=> ,,p' | head -n 1)
    if [[ -z $gnutls ]]; then
        derror "mandos-agent: libgnutls.so.30 not found (Debian package libgnutls30)"
        return 1
    fi
    inst_library "$gnutls" && _mandos_agent_inst_libs "$gnutls" || return 1
    # Byte-code alone, in place of the sources (X.pyc where X.py was, which Python loads
    # without looking for a source): nothing to compile under a slow CPU at boot, and 1.3 MB
    # less (zstd).  Without docstrings and asserts (-o 2: nothing the agent runs reads a
    # docstring) and without the column tables of tracebacks (no_debug_ranges; line numbers
    # stay), the byte-code is a third smaller.  Unchecked hashes: the same sources make the
    # same image.
    /usr/bin/python3 -I -X no_debug_ranges -m compileall -q -b -o 2 \
        --invalidation-mode unchecked-hash -s "$initdir" -p / "${targets[@]}" >/dev/null \
        && rm -f -- "${targets[@]}" || return 1
}

# The image holds the client's secret keys, so it must be readable by root alone.  dracut
# writes a new image under umask 077, but it copies the finished image onto an existing
# $outfile with cp, which keeps that file's mode: Debian's mkinitramfs makes images 0644, so
# rebuilding one with dracut -f would leave the keys readable by every local user.  Making
# the existing file private before the copy makes the result 0600 either way.
_mandos_agent_private_image() {
    [[ -n ${outfile-} && -e $outfile ]] || return 0
    if ! chmod 0600 -- "$outfile"; then
        dwarning "mandos-agent: cannot make $outfile private (chmod 0600); it will hold the" \
                 "Mandos client's secret keys: fix its mode before booting it"
    fi
}

install() {
    local keydir file unitdir="$systemdsystemunitdir"
    keydir=$(_mandos_agent_keydir) || return 1
    _mandos_agent_private_image
    _mandos_agent_install_python || return 1
    inst_multiple gpg gpg-agent gpgconf || return 1

    inst_dir /etc/mandos/keys
    chmod 0700 "$initdir/etc/mandos/keys"
    for file in pubkey.txt seckey.txt tls-pubkey.pem tls-privkey.pem; do
        inst_simple "$keydir/$file" "/etc/mandos/keys/$file" || return 1
        chown 0:0 "$initdir/etc/mandos/keys/$file"
        chmod 0600 "$initdir/etc/mandos/keys/$file"
    done
    # gpg wants a writable /tmp when /run is not enough.
    chmod 1777 "$initdir/tmp"

    inst_simple "$moddir/mandos-password-agent.path" "$unitdir/mandos-password-agent.path"
    inst_simple "$moddir/mandos-password-agent.service" "$unitdir/mandos-password-agent.service"
    # The administrator's options (e.g. --connect) from the installed system's drop-ins.
    inst_multiple -o /etc/systemd/system/mandos-password-agent.service.d/*.conf
    # Pull the network up along with the agent (so at boot), but do not wait for it: the agent
    # retries until the network carries its request.
    if dracut_module_included systemd-networkd; then
        mkdir -p "$initdir$unitdir/mandos-password-agent.service.d"
        printf '[Unit]\nWants=systemd-networkd.service\n' \
            > "$initdir$unitdir/mandos-password-agent.service.d/50-networkd.conf"
    fi
    $SYSTEMCTL -q --root "$initdir" enable mandos-password-agent.path || return 1

    if [[ $hostonly_cmdline == yes ]] && _mandos_agent_has_luks_volume; then
        mkdir -p "$initdir/etc/cmdline.d"
        printf 'rd.neednet=1\n' > "$initdir/etc/cmdline.d/90mandos-agent.conf"
    fi
}
