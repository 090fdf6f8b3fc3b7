#!/usr/bin/env bash
# AWS EC2 user-data: prepare the EBS volume, install the project, train under systemd.
# Safe to run again (reboot, spot replacement): it never formats a volume that has a file
# system, and training resumes from the newest checkpoint (local, else checkpoint.mirror on S3).
set -euo pipefail

# ---- settings: export them before running, or write them here when pasting as user-data ----
: "${CONFIG:=}"              # required: config file inside the repository, e.g. configs/imagenet1k.yaml
: "${TRAIN_OVERRIDES:=}"     # extra key=value overrides, space separated
: "${REPO_URL:=}"            # required unless SRC_DIR already holds a checkout: git URL of this project
: "${REPO_REF:=main}"        # branch or tag to check out
: "${CHECKPOINT_MIRROR:=}"   # required: s3://bucket/prefix where checkpoints are mirrored
: "${RUN_NAME:=resnet}"      # run.dir becomes MOUNT_POINT/runs/RUN_NAME
: "${DATA_TRAIN:=}"          # data.train: s3://... or a path on the volume (default: the config's)
: "${DATA_VAL:=}"            # data.val, likewise
: "${EBS_VOLUME_ID:=}"       # vol-...: attached to this instance if it is not already
: "${EBS_DEVICE:=}"          # block device of the volume (default: found from EBS_VOLUME_ID or lsblk)
: "${MOUNT_POINT:=/data}"
: "${SHARD_CACHE:=auto}"     # data.cache_dir: auto = an instance-store NVMe disk when there is one; a directory; or off
: "${CACHE_MOUNT:=/mnt/shard-cache}"  # where auto mounts the instance-store disk
: "${INSTALL_DIR:=/opt/resnet}"
: "${PYTHON:=python3}"
: "${DRY_RUN:=0}"            # 1: print what would be done, change nothing

SRC_DIR=$INSTALL_DIR/src
VENV=$INSTALL_DIR/venv
ENV_FILE=/etc/resnet/train.env
RUN_SCRIPT=/usr/local/bin/resnet-train
WATCH_SCRIPT=/usr/local/bin/resnet-spot-watch
UNIT_DIR=/etc/systemd/system
IMDS=http://169.254.169.254/latest

usage() {
  cat <<'USAGE'
Usage: [VAR=value ...] launch/ec2_bootstrap.sh [CONFIG [key=value ...]]

Bootstraps an EC2 GPU instance (as user-data, or by hand as root): finds the EBS volume
(attaching EBS_VOLUME_ID if needed), formats it only if it has no file system, mounts it at
MOUNT_POINT (fstab, nofail), installs the project into a venv, and starts the systemd unit
resnet-train.service, which restarts on failure and after a reboot. A second unit watches for
the spot interruption notice and stops training early so that it checkpoints. A replacement
instance with the same user-data resumes from the checkpoints mirrored to CHECKPOINT_MIRROR.

CONFIG and overrides come from the arguments, else from CONFIG and TRAIN_OVERRIDES.
Required: CONFIG, CHECKPOINT_MIRROR (s3://...), REPO_URL (unless INSTALL_DIR/src exists).
The settings block at the top of this script lists every variable; DRY_RUN=1 prints the plan.
USAGE
}

die() { echo "ec2_bootstrap: error: $*" >&2; exit 2; }
say() { echo "ec2_bootstrap: $*" >&2; }
dry() { [[ "$DRY_RUN" == 1 ]]; }

# Run a command, or print it (shell-quoted) under DRY_RUN=1.
run() {
  if dry; then
    printf '+ %q' "$1"; shift; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

# Write stdin to a file with a mode, or print it under DRY_RUN=1.
write_file() {
  local path=$1 mode=$2 content
  content=$(cat)
  if dry; then
    printf '+ write %s (mode %s):\n%s\n+ end of %s\n' "$path" "$mode" "$content" "$path"
    return
  fi
  mkdir -p "$(dirname "$path")"
  # Created owner-only (umask 077), then given its mode: the env file holds the W&B key and
  # must never be readable by others, not even between the write and the chmod.
  (umask 077 && printf '%s\n' "$content" > "$path.tmp")
  chmod "$mode" "$path.tmp"
  mv "$path.tmp" "$path"
}

imds_token() {
  curl -sf -X PUT "$IMDS/api/token" -H "X-aws-ec2-metadata-token-ttl-seconds: 300"
}

imds() {
  curl -sf -H "X-aws-ec2-metadata-token: $(imds_token)" "$IMDS/meta-data/$1"
}

# Nitro instances name EBS volumes by serial: /dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol...
volume_link() {
  echo "/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_${EBS_VOLUME_ID//-/}"
}

attach_volume() {
  local link instance region
  link=$(volume_link)
  if [[ -e "$link" ]]; then echo "$link"; return; fi
  if dry; then  # stdout is the device name here: the plan goes to stderr
    say "+ aws ec2 attach-volume --volume-id $EBS_VOLUME_ID --instance-id <this instance> --device /dev/sdf"
    echo "$link"
    return
  fi
  instance=$(imds instance-id) || die "cannot read the instance id from the metadata service"
  region=$(imds placement/region) || die "cannot read the region from the metadata service"
  say "attaching $EBS_VOLUME_ID to $instance (the volume must be in this availability zone)"
  aws ec2 attach-volume --region "$region" --volume-id "$EBS_VOLUME_ID" \
    --instance-id "$instance" --device /dev/sdf >/dev/null
  aws ec2 wait volume-in-use --region "$region" --volume-ids "$EBS_VOLUME_ID"
  local tries=0
  until [[ -e "$link" ]]; do
    (( ++tries <= 60 )) || die "$EBS_VOLUME_ID attached but $link did not appear"
    sleep 2
  done
  echo "$link"
}

# The only disk with no partitions and nothing mounted: an extra EBS volume on a fresh instance.
# Instance-store NVMe disks (model "Amazon EC2 NVMe Instance Storage") are never chosen: their
# data vanishes when the instance stops. Where the model says which disks are EBS ("Amazon
# Elastic Block Store", Nitro), only those count.
find_unused_disk() {
  local disk model found=() ebs=()
  while read -r disk; do
    if [[ $(lsblk -no NAME "$disk" | wc -l) -eq 1 ]] && [[ -z $(lsblk -no MOUNTPOINT "$disk" | tr -d '[:space:]') ]]; then
      model=$(lsblk -dno MODEL "$disk" | sed 's/[[:space:]]*$//')
      case $model in
        "Amazon EC2 NVMe Instance Storage"*) say "skipping $disk: instance store, lost on stop" ;;
        "Amazon Elastic Block Store"*) ebs+=("$disk"); found+=("$disk") ;;
        *) found+=("$disk") ;;
      esac
    fi
  done < <(lsblk -dpno NAME,TYPE | awk '$2 == "disk" {print $1}')
  if (( ${#ebs[@]} > 0 )); then found=("${ebs[@]}"); fi
  (( ${#found[@]} == 1 )) || die "found ${#found[@]} unused disks (${found[*]:-none}): set EBS_DEVICE or EBS_VOLUME_ID"
  echo "${found[0]}"
}

# Instance store: fast NVMe that is blank after a stop. Right for the shard cache, which S3 can
# always refill (data.cache_dir), never for checkpoints. Sets CACHE_DIR (empty: no cache).
CACHE_DIR=
prepare_cache() {
  case $SHARD_CACHE in
    off|"") return ;;
    auto) ;;
    *) CACHE_DIR=$SHARD_CACHE; run mkdir -p "$CACHE_DIR"; return ;;
  esac
  local disk='' mounted
  local d
  while read -r d; do
    if [[ $(lsblk -dno MODEL "$d") == "Amazon EC2 NVMe Instance Storage"* ]]; then disk=$d; break; fi
  done < <(lsblk -dpno NAME,TYPE | awk '$2 == "disk" {print $1}')
  if [[ -z "$disk" ]]; then
    say "no instance-store disk: shards stream from S3 without a node cache"
    return
  fi
  mounted=$(lsblk -no MOUNTPOINT "$disk" | awk 'NF {print; exit}')
  if [[ -n "$mounted" ]]; then
    CACHE_DIR=$mounted/shard-cache  # the AMI mounted it already
  else
    format_if_new "$disk"
    run mkdir -p "$CACHE_MOUNT"
    if dry || ! mountpoint -q "$CACHE_MOUNT"; then run mount "$disk" "$CACHE_MOUNT"; fi
    CACHE_DIR=$CACHE_MOUNT
  fi
  say "shard cache on the instance store $disk: data.cache_dir=$CACHE_DIR"
}

find_device() {
  if [[ -n "$EBS_DEVICE" ]]; then echo "$EBS_DEVICE"
  elif [[ -n "$EBS_VOLUME_ID" ]]; then attach_volume
  else find_unused_disk
  fi
}

# mkfs only when blkid positively reports no file system (exit 2); any other error stops here
# rather than risk formatting a volume that holds checkpoints.
format_if_new() {
  local dev=$1 status=0
  if dry; then
    echo "+ blkid -p $dev || mkfs.ext4 -L resnet-data $dev   # only when blkid finds no file system"
    return
  fi
  blkid -p "$dev" >/dev/null 2>&1 || status=$?
  case $status in
    0) say "$dev already has a file system: keeping it" ;;
    2) say "$dev is blank: formatting ext4"; mkfs.ext4 -q -L resnet-data "$dev" ;;
    *) die "blkid failed on $dev (status $status): not formatting" ;;
  esac
}

mount_volume() {
  local dev=$1 uuid line
  if dry; then uuid="<uuid of $dev>"; else uuid=$(blkid -s UUID -o value "$dev"); fi
  # nofail: a missing volume must not drop the instance into emergency mode at boot.
  line="UUID=$uuid $MOUNT_POINT ext4 defaults,nofail,x-systemd.device-timeout=30s 0 2"
  run mkdir -p "$MOUNT_POINT"
  if dry; then
    echo "+ append to /etc/fstab unless present: $line"
  elif ! grep -q "UUID=$uuid" /etc/fstab; then
    echo "$line" >> /etc/fstab
  fi
  if dry || ! mountpoint -q "$MOUNT_POINT"; then run mount "$MOUNT_POINT"; fi
}

install_project() {
  if [[ ! -d "$SRC_DIR/.git" ]]; then
    [[ -n "$REPO_URL" ]] || die "REPO_URL is not set and $SRC_DIR holds no checkout"
    run git clone --branch "$REPO_REF" "$REPO_URL" "$SRC_DIR"
  fi
  run "$PYTHON" -m venv "$VENV"
  run "$VENV/bin/pip" install --upgrade pip
  run "$VENV/bin/pip" install -e "$SRC_DIR"
}

# The training command, one line, exactly as systemd will run it.
train_command() {
  local overrides=("run.dir=$MOUNT_POINT/runs/$RUN_NAME" "checkpoint.mirror=$CHECKPOINT_MIRROR")
  [[ -n "$DATA_TRAIN" ]] && overrides+=("data.train=$DATA_TRAIN")
  [[ -n "$DATA_VAL" ]] && overrides+=("data.val=$DATA_VAL")
  [[ -n "$CACHE_DIR" ]] && overrides+=("data.cache_dir=$CACHE_DIR")
  printf 'exec %q %q' "$SRC_DIR/launch/single_node.sh" "$1"
  shift
  printf ' %q' "${overrides[@]}" "$@"
}

write_units() {
  local env_lines="PATH=$VENV/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
  local name
  local value
  for name in WANDB_MODE WANDB_API_KEY AWS_DEFAULT_REGION AWS_ENDPOINT_URL; do
    value=${!name:-}
    [[ -n "$value" ]] || continue
    if dry && [[ "$name" == WANDB_API_KEY ]]; then value="<hidden>"; fi
    env_lines+=$'\n'"$name=$value"
  done
  write_file "$ENV_FILE" 600 <<<"$env_lines"

  write_file "$RUN_SCRIPT" 755 <<RUN
#!/usr/bin/env bash
set -euo pipefail
cd $(printf '%q' "$SRC_DIR")
$(train_command "$@")
RUN

  write_file "$WATCH_SCRIPT" 755 <<'WATCH'
#!/usr/bin/env bash
# EC2 posts a spot interruption notice two minutes ahead: stop training now so it checkpoints.
imds=http://169.254.169.254/latest
while sleep 5; do
  token=$(curl -sf -X PUT "$imds/api/token" -H "X-aws-ec2-metadata-token-ttl-seconds: 60") || continue
  if curl -sf -H "X-aws-ec2-metadata-token: $token" "$imds/meta-data/spot/instance-action" >/dev/null; then
    echo "spot interruption notice: stopping resnet-train"
    systemctl stop resnet-train.service
    exit 0
  fi
done
WATCH

  write_file "$UNIT_DIR/resnet-train.service" 644 <<UNIT
[Unit]
Description=ResNet training (resumes from the newest checkpoint)
Wants=network-online.target
After=network-online.target
RequiresMountsFor=$MOUNT_POINT
# A failure that repeats (bad config, broken install) stops after 5 starts in an hour instead
# of restarting forever; \`systemctl reset-failed resnet-train\` then start it again.
StartLimitIntervalSec=3600
StartLimitBurst=5

[Service]
Type=simple
EnvironmentFile=$ENV_FILE
ExecStart=$RUN_SCRIPT
Restart=on-failure
RestartSec=30
# SIGTERM to the launcher, which passes it on; training saves a checkpoint before exiting.
KillMode=mixed
KillSignal=SIGTERM
TimeoutStopSec=100

[Install]
WantedBy=multi-user.target
UNIT

  write_file "$UNIT_DIR/resnet-spot-watch.service" 644 <<UNIT
[Unit]
Description=Stop ResNet training on a spot interruption notice
After=network-online.target

[Service]
ExecStart=$WATCH_SCRIPT
Restart=on-failure

[Install]
WantedBy=multi-user.target
UNIT
}

main() {
  if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then usage; exit 0; fi
  if [[ $# -ge 1 ]]; then
    CONFIG=$1; shift
  else
    local extra=()
    read -r -a extra <<<"$TRAIN_OVERRIDES"  # documented as space separated
    set -- "${extra[@]}"
  fi
  [[ -n "$CONFIG" ]] || die "CONFIG is not set (a config file inside the repository)"
  [[ -n "$CHECKPOINT_MIRROR" ]] || die "CHECKPOINT_MIRROR is not set (s3://bucket/prefix): without it a spot replacement starts over"
  [[ "$CHECKPOINT_MIRROR" == s3://?* ]] || die "CHECKPOINT_MIRROR must be an s3:// URL, got '$CHECKPOINT_MIRROR'"
  local item
  for item in "$@"; do
    [[ "$item" == *=* ]] || die "override '$item' is not of the form key=value"
  done
  dry || [[ $(id -u) -eq 0 ]] || die "run as root (user-data does), or with DRY_RUN=1"

  local dev
  dev=$(find_device)
  say "data volume: $dev"
  format_if_new "$dev"
  mount_volume "$dev"
  prepare_cache
  install_project
  if ! dry && [[ ! -f "$SRC_DIR/$CONFIG" && ! -f "$CONFIG" ]]; then
    die "config file not found: $CONFIG (relative paths are inside $SRC_DIR)"
  fi
  write_units "$CONFIG" "$@"
  run systemctl daemon-reload
  run systemctl enable --now resnet-spot-watch.service resnet-train.service
  say "training runs as resnet-train.service: journalctl -fu resnet-train"
}

main "$@"
