// Wire types of the gpuvisor API, as docs/api/openapi.json describes them (only what the
// console reads or sends).

export type Role = 'admin' | 'tenant-admin' | 'member' | 'viewer' | 'metrics';

export interface Session {
  tenant: string;
  role: Role;
  key_id: string;
  /** Unix ms. */
  expires_at: number;
}

export interface ApiErrorBody {
  error: { code: string; message: string };
}

export type InstanceState =
  | 'pending'
  | 'provisioning'
  | 'running'
  | 'stopping'
  | 'stopped'
  | 'terminating'
  | 'terminated'
  | 'failed'
  | 'interrupted';

export type RuntimeKind = 'container' | 'vm';

export interface GpuBinding {
  uuid: string;
  index: number;
  model: string;
  /** Thousandths of a GPU (1000 = whole). */
  milli: number;
  /** VRAM reserved, bytes. */
  vram: number;
}

export interface PortSpec {
  port: number;
  protocol: string;
  public?: boolean;
  host_port?: number | null;
}

export interface VolumeMount {
  name: string;
  path: string;
  size?: number | null;
}

export interface InstanceCost {
  currency: string;
  per_hour: number;
  total: number;
}

export interface GpuUsage {
  uuid: string;
  vram_used: number;
  vram_quota: number;
  share_milli: number;
  util_milli: number;
  launches: number;
}

export interface FractionGuarantee {
  summary: string;
  vram_quota_enforced: boolean;
  compute_share_enforced: boolean;
  bypass_detection: boolean;
}

export interface GuestMemory {
  actual: number;
  available?: number | null;
  total?: number | null;
  used?: number | null;
  reported_at?: number | null;
}

export interface Instance {
  id: string;
  name: string;
  tenant: string;
  image: string;
  state: InstanceState;
  desired: InstanceState;
  runtime?: RuntimeKind;
  vcpus: number;
  cpus: number[];
  memory: number;
  container_disk: number;
  gpus: GpuBinding[];
  gpu_fraction?: FractionGuarantee | null;
  gpu_usage?: GpuUsage[];
  guest_memory?: GuestMemory | null;
  volumes: VolumeMount[];
  env: string[];
  ports: PortSpec[];
  urls?: string[];
  command: string[];
  created_at: number;
  updated_at: number;
  reason?: string | null;
  exit_code?: number | null;
  ip?: string | null;
  node?: string;
  accel?: string | null;
  cost?: InstanceCost | null;
  restart?: string;
  restart_count?: number;
  priority?: string;
  interruptible?: boolean;
}

export interface Template {
  name: string;
  image: string;
  public: boolean;
  created_at: number;
  description?: string | null;
  runtime?: RuntimeKind | null;
  gpus?: number | null;
  gpu_fraction?: number | null;
  gpu_model?: string | null;
  vcpus?: number | null;
  memory?: number | null;
  container_disk?: number | null;
  env?: string[];
  ports?: PortSpec[];
  volumes?: VolumeMount[];
  command?: string[];
  tenant?: string | null;
}

export interface Logs {
  offset: number;
  next: number;
  data: string;
}

export interface InstanceEvent {
  at: number;
  instance: string;
  kind: string;
  message: string;
}

export interface MetricPoint {
  t: number;
  avg: number;
  max: number;
}

export interface MetricSeries {
  metric: string;
  points: MetricPoint[];
}

export interface MetricsHistory {
  /** `instance` (id: the instance's) or `gpu` (id: the GPU's UUID). */
  kind: string;
  id: string;
  step_s: number;
  series: MetricSeries[];
}

/** One message of an instance's metrics stream (`/v1/instances/{id}/metrics/ws`): the points of
 * each history from the newest one sent before (that bucket again: it may have grown). */
export interface MetricsUpdate {
  /** Unix ms of the sample that made it. */
  at: number;
  histories: MetricsHistory[];
}

export interface MigSlice {
  parent_uuid: string;
  gi: number;
  ci: number;
  profile: string;
  slices: number;
}

export interface Gpu {
  uuid: string;
  index: number;
  model: string;
  vram: number;
  pci_address: string;
  backend: string;
  allocated_milli: number;
  allocated_vram: number;
  instances: string[];
  cordoned?: string | null;
  driver?: string | null;
  mig?: MigSlice | null;
  mig_enabled?: boolean;
  numa_node?: number | null;
  passthrough_ready?: boolean;
}

/** One event of a GPU (`GET /v1/gpus/events`, operators): newest first. */
export interface GpuEvent {
  /** Unix ms. */
  at: number;
  /** The GPU's UUID. */
  gpu: string;
  index: number;
  kind: 'xid' | 'thermal' | 'thermal_cleared' | 'gpu_lost' | 'cordoned' | 'uncordoned' | (string & {});
  message: string;
}

/** One result of the host preflight (`GET /v1/host/checks`, admins). */
export interface HostCheck {
  id: string;
  title: string;
  status: 'pass' | 'warn' | 'fail' | 'skip';
  detail: string;
  remedy?: string;
}

export interface GpuStats {
  uuid: string;
  index: number;
  model: string;
  at: number;
  util_percent?: number | null;
  memory_used?: number | null;
  memory_total: number;
  temperature_c?: number | null;
  power_w?: number | null;
  sm_clock_mhz?: number | null;
  mem_clock_mhz?: number | null;
  throttle_reasons?: number | null;
  pcie_tx_kbs?: number | null;
  pcie_rx_kbs?: number | null;
  ecc_corrected?: number | null;
  ecc_uncorrected?: number | null;
  xid_errors: number;
  last_xid?: number | null;
  instances: number;
  cordoned?: string | null;
  alarms: string[];
  simulated: boolean;
}

export interface Placement {
  start: number;
  size: number;
}

export interface GiProfile {
  profile: number;
  id: number;
  name: string;
  slices: number;
  memory_mib: number;
  multiprocessors: number;
  max_instances: number;
  free: number;
  placements: Placement[];
}

export interface ComputeInstance {
  id: number;
  profile_id: number;
}

export interface GpuInstance {
  id: number;
  profile_id: number;
  profile: string;
  placement: Placement;
  compute_instances: ComputeInstance[];
}

export interface MigState {
  gpu: string;
  enabled: boolean;
  profiles: GiProfile[];
  instances: GpuInstance[];
}

export interface UsageLine {
  tenant: string;
  subject: string;
  id: string;
  name: string;
  resource: string;
  seconds: number;
  unit_seconds: number;
  unit_price: number;
  cost: number;
  model?: string | null;
  milli?: number | null;
  interruptible?: boolean;
}

export interface UsageReport {
  from: number;
  to: number;
  currency: string;
  lines: UsageLine[];
  total_cost: number;
}

export interface JobCounts {
  completed: number;
  failed: number;
  inProgress: number;
  inQueue: number;
  retried: number;
}

export interface WorkerCounts {
  idle: number;
  running: number;
  initializing: number;
  ready: number;
  parked: number;
  throttled: number;
  unhealthy: number;
}

/** Nearest-rank percentiles of durations, ms. */
export interface Percentiles {
  n: number;
  p50: number;
  p95: number;
  p99: number;
  max: number;
}

/** An endpoint's jobs that ended in the last `window_s` seconds. */
export interface EndpointStats {
  window_s: number;
  completed: number;
  failed: number;
  timed_out: number;
  cancelled: number;
  per_minute: number;
  /** Time queued (created to claimed); absent when no job of the window was claimed. */
  delay_ms?: Percentiles;
  /** Time run (claimed to ended). */
  execution_ms?: Percentiles;
}

export interface Endpoint {
  id: string;
  name: string;
  tenant: string;
  created_at: number;
  template: string;
  path: string;
  health: { jobs: JobCounts; workers: WorkerCounts };
  stats: EndpointStats;
  workers_min?: number;
  workers_max?: number;
  gpus?: number | null;
  gpu_fraction?: number | null;
  idle_timeout_secs?: number;
  execution_timeout_ms?: number;
  flashboot?: boolean;
  scaler?: { kind: string; value: number };
}
