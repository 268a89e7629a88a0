# shellcheck shell=bash
# The one environment file for forgepipe jobs on Frontier: node shape, RCCL over Slingshot,
# libfabric, MIOpen caches, container binds. Sourced by launch.sh inside the batch job (and by
# submit.sh for checks and --dry-run). Every value is a default: a variable already set wins.
# Follows OLCF's "PyTorch on Frontier" and "Containers on Frontier" guidance.

# --- Node shape and launch switches -------------------------------------------------------------
# One rank per GCD: 8 per node, 7 cores each (Frontier reserves one core per L3 region).
: "${GPUS_PER_NODE:=8}"
: "${CPUS_PER_TASK:=7}"
# apptainer: srun starts `apptainer exec --rocm IMAGE forgepipe ...`; direct: srun starts
# `$FORGEPIPE_BIN` from the job's own environment (a conda env, or CI's virtualenv).
: "${FORGEPIPE_LAUNCHER:=apptainer}"
: "${FORGEPIPE_BIN:=forgepipe}"
# gpu: ask Slurm for GPUs and bind them; cpu: no GPU flags at all (the localhost CI cluster).
: "${FORGEPIPE_DEVICE:=gpu}"
# How ranks see GCDs. all: every rank sees the node's 8 GCDs and takes cuda:LOCAL_RANK, so
# DeepSpeed's get_accelerator().device_count() is 8 and ZeRO++ qgZ builds its per-node all-to-all
# groups right (it sizes them from device_count()). closest: Slurm gives each rank its one nearest
# GCD (OLCF's usual form); device_count() is then 1 and qgZ is refused (see launch.sh).
: "${FORGEPIPE_GPU_BIND:=all}"
# With `all`, GCD order by local rank so that cuda:LOCAL_RANK is the GCD closest to the rank's 7
# cores (ranks 0-7 get cores 1-7, 9-15, ..., 57-63; their nearest GCDs are 4,5,2,3,6,7,0,1).
: "${FORGEPIPE_GCD_ORDER:=4,5,2,3,6,7,0,1}"
# Exit status forgepipe uses when it stopped on a signal and wants the job resubmitted.
: "${FORGEPIPE_EXIT_REQUEUE:=85}"
# A job stopped by the walltime warning submits itself again (see launch.sh), at most this many
# times in a chain (0: never); FORGEPIPE_RESUBMIT_COUNT is how many times it has so far.
: "${FORGEPIPE_MAX_RESUBMITS:=10}"
: "${FORGEPIPE_RESUBMIT_COUNT:=0}"
export GPUS_PER_NODE CPUS_PER_TASK FORGEPIPE_LAUNCHER FORGEPIPE_BIN FORGEPIPE_DEVICE \
    FORGEPIPE_GPU_BIND FORGEPIPE_GCD_ORDER FORGEPIPE_EXIT_REQUEUE FORGEPIPE_MAX_RESUBMITS FORGEPIPE_RESUBMIT_COUNT

# Nodes of this job (inside the allocation Slurm says; before submission, NODES or 1).
: "${NODES:=${SLURM_JOB_NUM_NODES:-1}}"
export NODES

# --- Staging to node-local NVMe -----------------------------------------------------------------
# Imports from Lustre take minutes at scale; with FORGEPIPE_STAGE_IMAGE=1 the image is copied once per
# node with sbcast to the NVMe (the job must ask for it: submit.sh adds `-C nvme`).
: "${FORGEPIPE_STAGE_IMAGE:=0}"
: "${FORGEPIPE_NVME_DIR:=/mnt/bb/${USER:-$(id -un)}}"
export FORGEPIPE_STAGE_IMAGE FORGEPIPE_NVME_DIR

# --- RCCL over Slingshot ------------------------------------------------------------------------
# The libfabric plugin only initialises on multi-node jobs (the network is not set up for one
# node), so OFI is forced only then: a multi-node run then fails at start if the plugin is
# missing, instead of silently using TCP sockets.
if [[ -z "${NCCL_NET:-}" ]]; then
    if (( NODES > 1 )); then export NCCL_NET=OFI; else export NCCL_NET=Socket; fi
fi
# Let rings and trees use any of a node's four NICs.
export NCCL_CROSS_NIC="${NCCL_CROSS_NIC:-1}"
# GPU-direct RDMA whenever GCD and NIC share a PCIe host bridge.
export NCCL_NET_GDR_LEVEL="${NCCL_NET_GDR_LEVEL:-PHB}"
# Bootstrap and socket traffic on the Slingshot interfaces (try hsn0 alone if a run hangs).
export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-hsn0,hsn1,hsn2,hsn3}"
# Fine-grained PCIe memory for the plugin's host buffers (HPE/AMD recommendation for RCCL).
export HSA_FORCE_FINE_GRAIN_PCIE="${HSA_FORCE_FINE_GRAIN_PCIE:-1}"

# --- libfabric (CXI provider) -------------------------------------------------------------------
# kdreg2 is the registration-cache monitor that is safe with the plugin; memhooks deadlocks.
export FI_MR_CACHE_MONITOR="${FI_MR_CACHE_MONITOR:-kdreg2}"
# Do not register host buffers with the NIC (avoids registration failures with RCCL).
export FI_CXI_DISABLE_HOST_REGISTER="${FI_CXI_DISABLE_HOST_REGISTER:-1}"
# Larger completion and transmit queues: collectives at scale overflow the defaults.
export FI_CXI_DEFAULT_CQ_SIZE="${FI_CXI_DEFAULT_CQ_SIZE:-131072}"
export FI_CXI_DEFAULT_TX_SIZE="${FI_CXI_DEFAULT_TX_SIZE:-2048}"
# Hardware matching with software fallback when the NIC's match tables fill.
export FI_CXI_RX_MATCH_MODE="${FI_CXI_RX_MATCH_MODE:-hybrid}"
# Alternative rendezvous protocol: faster RCCL at scale, but only valid in an allocation made with
# --network=disable_rdzv_get (submit.sh adds it when FORGEPIPE_ALT_RDZV=1).
: "${FORGEPIPE_ALT_RDZV:=0}"
export FORGEPIPE_ALT_RDZV
if [[ "$FORGEPIPE_ALT_RDZV" == 1 ]]; then
    export FI_CXI_RDZV_PROTO="${FI_CXI_RDZV_PROTO:-alt_read}"
    export FI_CXI_RDZV_EAGER_SIZE="${FI_CXI_RDZV_EAGER_SIZE:-0}"
    export FI_CXI_RDZV_THRESHOLD="${FI_CXI_RDZV_THRESHOLD:-0}"
    export FI_CXI_RDZV_GET_MIN="${FI_CXI_RDZV_GET_MIN:-0}"
fi

# --- MIOpen -------------------------------------------------------------------------------------
# MIOpen's user database is one sqlite file; thousands of ranks writing it on NFS or Lustre fail
# with "disk I/O error". Keep it, and the kernel cache, per node and per job under /tmp.
export MIOPEN_USER_DB_PATH="${MIOPEN_USER_DB_PATH:-/tmp/miopen-${USER:-$(id -un)}-${SLURM_JOB_ID:-local}}"
export MIOPEN_CUSTOM_CACHE_DIR="${MIOPEN_CUSTOM_CACHE_DIR:-$MIOPEN_USER_DB_PATH}"

# --- Inside the container -----------------------------------------------------------------------
# The host's Cray libfabric (the only one with the CXI provider) goes first on the container's
# library path, ahead of the image's own; Apptainer does not pass the host LD_LIBRARY_PATH itself.
if [[ -z "${FORGEPIPE_LIBFABRIC_DIR:-}" ]]; then
    # The newest /opt/cray/libfabric/<version>/lib64 on this host, if any.
    FORGEPIPE_LIBFABRIC_DIR="$( (compgen -G '/opt/cray/libfabric/*/lib64' || true) | sort -V | tail -n 1)"
fi
export FORGEPIPE_LIBFABRIC_DIR
if [[ "$FORGEPIPE_LAUNCHER" == apptainer && -n "$FORGEPIPE_LIBFABRIC_DIR" ]]; then
    export APPTAINERENV_LD_LIBRARY_PATH="${APPTAINERENV_LD_LIBRARY_PATH:-$FORGEPIPE_LIBFABRIC_DIR:${CRAY_LD_LIBRARY_PATH:-/opt/cray/pe/lib64}:/opt/aws-ofi-nccl/lib:/opt/libfabric/lib}"
    # System libraries the CXI provider links against, copied into the container's library dir
    # (only those present on this host are named).
    if [[ -z "${APPTAINER_CONTAINLIBS:-}" ]]; then
        _fp_libs=()
        for _fp_lib in /usr/lib64/libcxi.so.1 /usr/lib64/libjson-c.so.3 /usr/lib64/libjson-c.so.5 \
            /usr/lib64/libnl-3.so.200 /usr/lib64/libnl-route-3.so.200 /usr/lib64/libjansson.so.4 /usr/lib64/libdrm.so.2; do
            [[ -e "$_fp_lib" ]] && _fp_libs+=("$_fp_lib")
        done
        if (( ${#_fp_libs[@]} )); then
            APPTAINER_CONTAINLIBS="$(IFS=,; echo "${_fp_libs[*]}")"
            export APPTAINER_CONTAINLIBS
        fi
        unset _fp_lib _fp_libs
    fi
fi
# Host directories the container needs: the Cray libraries and Slurm's spool (for the step's
# environment). The model, data and output directories are added by launch.sh; add more with
# FORGEPIPE_BINDS (comma-separated).
: "${FORGEPIPE_SYSTEM_BINDS:=/opt/cray,/usr/share/libdrm,/var/spool/slurmd}"
export FORGEPIPE_SYSTEM_BINDS
