# shellcheck shell=bash
# The one environment file for forgepipe runs: on Frontier (node shape, RCCL over Slingshot,
# libfabric, caches, what the container sees) and on a workstation (scripts/local/run.sh sources it
# with FORGEPIPE_SITE=local: caches and container variables only, no Slingshot settings). Sourced
# by launch.sh inside the batch job (and by submit.sh for checks and --dry-run). Every value is a
# default: a variable already set wins. Follows OLCF's "PyTorch on Frontier" and "Containers on
# Frontier" guidance.

# frontier: everything below; local: a Docker run on a workstation (scripts/local/run.sh).
: "${FORGEPIPE_SITE:=frontier}"
export FORGEPIPE_SITE

# --- Settings derived from where this runs ------------------------------------------------------
# What this file derives from the host and the job (the node count, the job id, the loaded libfabric
# module, ...) is derived again wherever it is sourced: submit.sh sources it on a login node and
# sbatch exports the whole environment into the job (a job into the job it resubmits, too), where
# those values would otherwise arrive frozen: caches named for no job ("-local") or for the last
# one, the login node's libfabric and its libraries. FORGEPIPE_ENV_DERIVED names them: they are
# dropped here and computed afresh. A variable you set yourself is never in it, and is kept.
for _fp_var in ${FORGEPIPE_ENV_DERIVED:-}; do unset "$_fp_var"; done
FORGEPIPE_ENV_DERIVED=""
fp_derive() {  # fp_derive NAME VALUE: export NAME=VALUE unless NAME is set (yours); noted as derived
    if [[ -z "${!1:-}" ]]; then
        export "$1=$2"
        FORGEPIPE_ENV_DERIVED+=" $1"
    fi
}

# --- Node shape and launch switches -------------------------------------------------------------
# One rank per GCD: 8 per node, 7 cores each (Frontier reserves one core per L3 region).
: "${GPUS_PER_NODE:=8}"
: "${CPUS_PER_TASK:=7}"
# apptainer: srun starts `apptainer exec IMAGE forgepipe ...`; direct: srun starts
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
fp_derive NODES "${SLURM_JOB_NUM_NODES:-1}"

# Threads per rank: the rank's own cores (torch's and OpenMP's default is every core of the node).
fp_derive OMP_NUM_THREADS "$CPUS_PER_TASK"

# --- Staging to node-local NVMe -----------------------------------------------------------------
# Imports from Lustre take minutes at scale; with FORGEPIPE_STAGE_IMAGE=1 the image is copied once per
# node with sbcast to the NVMe (the job must ask for it: submit.sh adds `-C nvme`).
: "${FORGEPIPE_STAGE_IMAGE:=0}"
: "${FORGEPIPE_NVME_DIR:=/mnt/bb/${USER:-$(id -un)}}"
export FORGEPIPE_STAGE_IMAGE FORGEPIPE_NVME_DIR

# RCCL's libfabric plugin check on multi-node jobs (see below and launch.sh).
: "${FORGEPIPE_OFI_CHECK:=1}"
: "${FORGEPIPE_OFI_TIMEOUT:=300}"
: "${FORGEPIPE_OFI_PROVIDER:=cxi}"
export FORGEPIPE_OFI_CHECK FORGEPIPE_OFI_TIMEOUT FORGEPIPE_OFI_PROVIDER

if [[ "$FORGEPIPE_SITE" == frontier ]]; then
# --- RCCL over Slingshot ------------------------------------------------------------------------
# The libfabric plugin only initialises on multi-node jobs (the network is not set up for one
# node), so OFI is forced only then: a multi-node run then fails at start if the plugin is
# missing, instead of silently using TCP sockets.
if (( NODES > 1 )); then fp_derive NCCL_NET OFI; else fp_derive NCCL_NET Socket; fi
# On such a job launch.sh also watches RCCL's own report (NCCL_DEBUG=INFO, INIT and NET lines) for
# the plugin: the run stops with the cause when it does not load, rather than hang or crawl.
# FORGEPIPE_OFI_CHECK=0 turns this off; FORGEPIPE_OFI_TIMEOUT (seconds from RCCL's first line to
# its "Using network" line) bounds a silent start; FORGEPIPE_OFI_PROVIDER is the libfabric provider
# the plugin must pick (cxi: Slingshot).
if [[ "$NCCL_NET" == OFI && "$FORGEPIPE_OFI_CHECK" == 1 ]]; then
    fp_derive NCCL_DEBUG INFO
    fp_derive NCCL_DEBUG_SUBSYS INIT,NET
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

# --- Rendezvous port and offline compute nodes --------------------------------------------------
# forgepipe's rank-0 rendezvous port, one per job (two jobs may share a node), below Linux's
# ephemeral range (32768-60999), from which any process's outgoing connection may already hold it.
if [[ -n "${SLURM_JOB_ID:-}" && "$SLURM_JOB_ID" =~ ^[0-9]+$ ]]; then
    fp_derive MASTER_PORT "$(( 20000 + SLURM_JOB_ID % 12768 ))"
fi
# Compute nodes have no internet: a stray Hub access (a model or data name that is not a local
# path) fails at once with the name, instead of retrying until a timeout.
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
export TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}"
fi  # FORGEPIPE_SITE == frontier

# --- Caches and home: node-local, one set per job ----------------------------------------------
# Many ranks writing one sqlite file or cache directory on NFS ($HOME) or Lustre fail with disk I/O
# errors or lock contention, and a cache shared between jobs can hold another build's kernels: every
# cache goes to node-local /tmp (memory-backed on Frontier's compute nodes), one directory per user
# and job. forgepipe's own tokenized-data cache is not among them: it lives in the output directory
# (shared, so that rank 0 builds it once for every node).
fp_derive FORGEPIPE_NODE_TMP "/tmp/forgepipe-${USER:-$(id -un)}-${SLURM_JOB_ID:-local}"
# MIOpen's user database (one sqlite file) and kernel cache.
fp_derive MIOPEN_USER_DB_PATH "$FORGEPIPE_NODE_TMP/miopen"
fp_derive MIOPEN_CUSTOM_CACHE_DIR "$MIOPEN_USER_DB_PATH"
# Hugging Face: Frontier's compute nodes have no internet, models and data are local paths, so the
# hub cache and `datasets`' Arrow cache of raw files are per job. On a workstation the hub cache is
# the user's own (downloads are kept; run.sh binds it).
if [[ "$FORGEPIPE_SITE" == local ]]; then
    fp_derive HF_HOME "${XDG_CACHE_HOME:-$HOME/.cache}/huggingface"
else
    fp_derive HF_HOME "$FORGEPIPE_NODE_TMP/hf"
fi
fp_derive HF_DATASETS_CACHE "$FORGEPIPE_NODE_TMP/hf-datasets"
# Triton's compiled kernels and torch's JIT extensions (DeepSpeed ops not prebuilt in the image).
fp_derive TRITON_CACHE_DIR "$FORGEPIPE_NODE_TMP/triton"
fp_derive TORCH_EXTENSIONS_DIR "$FORGEPIPE_NODE_TMP/torch-extensions"
# A user's ~/.local packages must never shadow the image's (or the job environment's).
export PYTHONNOUSERSITE="${PYTHONNOUSERSITE:-1}"

# --- Inside the container -----------------------------------------------------------------------
# Apptainer does not let a host variable override one the image sets (%environment, the base
# image's ENV), only APPTAINERENV_<NAME>, and it evaluates APPTAINERENV_ values in the container
# after the image's own environment. So every variable this file sets for the run is passed as
# APPTAINERENV_<NAME> (docker: -e NAME, by run.sh); FORGEPIPE_CONTAINER_ENV lists them.
FORGEPIPE_CONTAINER_ENV="MIOPEN_USER_DB_PATH MIOPEN_CUSTOM_CACHE_DIR HF_HOME HF_DATASETS_CACHE TRITON_CACHE_DIR TORCH_EXTENSIONS_DIR PYTHONNOUSERSITE FORGEPIPE_NODE_TMP"
if [[ "$FORGEPIPE_SITE" == frontier ]]; then
    FORGEPIPE_CONTAINER_ENV+=" NCCL_NET NCCL_CROSS_NIC NCCL_NET_GDR_LEVEL NCCL_SOCKET_IFNAME HSA_FORCE_FINE_GRAIN_PCIE"
    FORGEPIPE_CONTAINER_ENV+=" HF_HUB_OFFLINE HF_DATASETS_OFFLINE TRANSFORMERS_OFFLINE OMP_NUM_THREADS"
    FORGEPIPE_CONTAINER_ENV+=" FI_MR_CACHE_MONITOR FI_CXI_DISABLE_HOST_REGISTER FI_CXI_DEFAULT_CQ_SIZE FI_CXI_DEFAULT_TX_SIZE FI_CXI_RX_MATCH_MODE"
    if [[ "$FORGEPIPE_ALT_RDZV" == 1 ]]; then
        FORGEPIPE_CONTAINER_ENV+=" FI_CXI_RDZV_PROTO FI_CXI_RDZV_EAGER_SIZE FI_CXI_RDZV_THRESHOLD FI_CXI_RDZV_GET_MIN"
    fi
fi
for _fp_var in MASTER_PORT NCCL_DEBUG NCCL_DEBUG_SUBSYS FI_PROVIDER MLFLOW_TRACKING_URI FORGEPIPE_MODEL_ROOT FORGEPIPE_CATALOG; do
    if [[ -n "${!_fp_var:-}" ]]; then FORGEPIPE_CONTAINER_ENV+=" $_fp_var"; fi
done
unset _fp_var
export FORGEPIPE_CONTAINER_ENV

# RCCL's libfabric plugin is the image's: a host `rccl-net-plugin` module sets NCCL_NET_PLUGIN to a
# host path that does not exist in the container, so the image's path is passed explicitly.
: "${FORGEPIPE_NCCL_NET_PLUGIN:=/opt/aws-ofi-nccl/lib/librccl-net.so}"
export FORGEPIPE_NCCL_NET_PLUGIN

# The host's Cray libfabric is the only one with the CXI (Slingshot) provider: it goes first on the
# container's library path, the image's own path (ROCm, the plugin, its libfabric) after it.
# FORGEPIPE_LIBFABRIC_DIR: its lib64 directory; default: the loaded libfabric module's, i.e. the
# first directory on LD_LIBRARY_PATH that holds libfabric.so.1 (what a host program would load;
# never merely the newest version on disk).
fp_module_libfabric_dir() {
    local dir
    local -a dirs
    IFS=: read -r -a dirs <<< "${LD_LIBRARY_PATH:-}"
    for dir in "${dirs[@]}"; do
        if [[ -n "$dir" && -e "$dir/libfabric.so.1" ]]; then echo "$dir"; return 0; fi
    done
    return 0
}
if [[ "$FORGEPIPE_SITE" == frontier ]]; then fp_derive FORGEPIPE_LIBFABRIC_DIR "$(fp_module_libfabric_dir)"; fi
: "${FORGEPIPE_LIBFABRIC_DIR:=}"
export FORGEPIPE_LIBFABRIC_DIR

# System libraries the host libfabric's CXI provider needs, copied into the container's
# /.singularity.d/libs (Apptainer puts that directory first on the library path, over the image's
# own copies): OLCF's list for RCCL in containers (libcxi, json-c, libnl, jansson, libxpmem) and,
# of what `ldd` says the host libfabric links from the system directories, only those same
# libraries (another soname of them). Nothing else: libdrm, libcurl, libssl, libcrypto and the
# rest of the closure would shadow the image's own for every library in the container
# (`forgepipe doctor` shows where each one loads from). Only files present are named.
fp_fabric_libs() {
    local lib
    {
        printf '%s\n' /usr/lib64/libcxi.so.1 /usr/lib64/libjson-c.so.3 /usr/lib64/libjson-c.so.5 \
            /usr/lib64/libnl-3.so.200 /usr/lib64/libnl-route-3.so.200 /usr/lib64/libjansson.so.4 \
            /usr/lib64/libxpmem.so.0
        if [[ -n "$FORGEPIPE_LIBFABRIC_DIR" && -e "$FORGEPIPE_LIBFABRIC_DIR/libfabric.so.1" ]] && command -v ldd >/dev/null; then
            { ldd "$FORGEPIPE_LIBFABRIC_DIR/libfabric.so.1" 2>/dev/null || true; } | awk '$2 == "=>" && $3 ~ /^\/(usr\/)?lib64\// {print $3}'
        fi
    } | while IFS= read -r lib; do
        case "$(basename "$lib")" in
            libcxi.so* | libjson-c.so* | libnl-3.so* | libnl-route-3.so* | libjansson.so* | libxpmem.so*) ;;
            *) continue ;;
        esac
        if [[ -e "$lib" ]]; then echo "$lib"; fi
    done | awk '!seen[$0]++'
}

if [[ "$FORGEPIPE_LAUNCHER" == apptainer ]]; then
    for _fp_var in $FORGEPIPE_CONTAINER_ENV; do
        _fp_name="APPTAINERENV_$_fp_var"
        fp_derive "$_fp_name" "${!_fp_var}"
    done
    unset _fp_var _fp_name
    export APPTAINERENV_NCCL_NET_PLUGIN="${APPTAINERENV_NCCL_NET_PLUGIN:-$FORGEPIPE_NCCL_NET_PLUGIN}"
    if [[ "$FORGEPIPE_SITE" == frontier && -n "$FORGEPIPE_LIBFABRIC_DIR" ]]; then
        # The literal $LD_LIBRARY_PATH is expanded inside the container, after the image's own
        # environment: the host libfabric first, then everything the image put there.
        # shellcheck disable=SC2016
        fp_derive APPTAINERENV_LD_LIBRARY_PATH "$FORGEPIPE_LIBFABRIC_DIR:\$LD_LIBRARY_PATH"
        if [[ -z "${APPTAINER_CONTAINLIBS:-}" ]]; then
            _fp_libs="$(fp_fabric_libs | paste -sd, -)"
            if [[ -n "$_fp_libs" ]]; then fp_derive APPTAINER_CONTAINLIBS "$_fp_libs"; fi
            unset _fp_libs
        fi
    fi
fi
# Host directories the container needs: the Cray libraries and Slurm's spool (for the step's
# environment). The directories a stage reads and writes are added by launch.sh; add more with
# FORGEPIPE_BINDS (comma-separated).
if [[ "$FORGEPIPE_SITE" == frontier ]]; then
    : "${FORGEPIPE_SYSTEM_BINDS:=/opt/cray,/usr/share/libdrm,/var/spool/slurmd}"
else
    : "${FORGEPIPE_SYSTEM_BINDS:=}"
fi
export FORGEPIPE_SYSTEM_BINDS

# Host variables a container must not inherit (Apptainer passes every host variable the image does
# not set): a module's PYTHONPATH would put the host's packages before the image's, a host ROCm's
# path its tools and libraries. Dropped here, for the job and its srun, with the container
# launcher; FORGEPIPE_HOST_ONLY_ENV names them.
: "${FORGEPIPE_HOST_ONLY_ENV:=PYTHONPATH PYTHONHOME ROCM_PATH ROCM_HOME HIP_PATH}"
export FORGEPIPE_HOST_ONLY_ENV
if [[ "$FORGEPIPE_LAUNCHER" == apptainer ]]; then
    for _fp_var in $FORGEPIPE_HOST_ONLY_ENV; do unset "$_fp_var"; done
    unset _fp_var
fi
export FORGEPIPE_ENV_DERIVED
