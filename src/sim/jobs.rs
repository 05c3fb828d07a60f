//! The data backfill job families: create, list, get and stop.
//!
//! Three families share one shape (as `API-FACTS.md` says):
//! `/v1/uno/data-backfill/propagation/jobs` (auto backfill), `/v1/uno/data-backfill/jobs`
//! (file-based) and `/v1/uno/data-backfill/bookingdate/jobs`.
//!
//! | request | answer |
//! |---|---|
//! | `POST …/jobs` `{"type","batchSize","dryRun"}` | `{"success":true,"jobId":"<32 hex>"}`; honours `Idempotency-Key` |
//! | `GET …/jobs[?pageSize=&page=]` | `{"success":true,"jobs":[…]}`, newest first |
//! | `GET …/jobs/{jobId}` | `{"success":true,"job":{…}}`; unknown id → 404 (category 40) |
//! | `PUT …/jobs/{jobId}` `{"status":"Stopping"}` | `{"processId","reasons":[],"requestId","success":true}` |
//!
//! Each family starts with 40 seeded jobs (so a list is well over 1000 bytes). Jobs move through
//! their statuses lazily, computed from the clock when read: a created job is `Pending` for
//! 300 ms, `Processing` for two minutes, then `Completed`; a stopped job is `Stopping` for one
//! second, then `Stopped`.
//!
//! Stop rules: a `jobId` that is not exactly 32 characters → 400 (category 20); a body that is
//! not JSON → 400 (category 90); no `status` → 400 (category 22); any value but `"Stopping"` →
//! 400 (category 20). A well-formed id the simulator does not know is taken as a running job
//! (created on the fly), so documentation examples with any valid id work. Stopping a job that
//! is already stopping or finished is a 200 that leaves its status alone.
//!
//! Reason codes are `5340F0` + category, with F the family (1 propagation, 2 file-based,
//! 3 booking date): `53401020` is an invalid value in the propagation family.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::header::ALLOW;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use serde::Serialize;
use serde_json::Value;

use super::control::{JobSnapshot, lock};
use super::response::{Category, Ctx, Reply, Resource, process_id, random_hex};

const PENDING_FOR: Duration = Duration::from_millis(300);
const CREATED_RUN_FOR: Duration = Duration::from_secs(120);
const STOPPING_FOR: Duration = Duration::from_secs(1);
const SEEDED_JOBS: usize = 40;
/// Oldest jobs are forgotten past this, so a long benchmark cannot grow the store forever.
const MAX_JOBS_PER_FAMILY: usize = 10_000;
const MAX_IDEMPOTENCY_KEYS: usize = 10_000;
const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;
const MAX_BATCH_SIZE: u64 = 1000;
const MAX_PAGE_SIZE: usize = 1000;
const JOB_ID_LEN: usize = 32;

static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// One of the three job families.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Propagation,
    FileBased,
    BookingDate,
}

impl Family {
    const ALL: [Self; 3] = [Self::Propagation, Self::FileBased, Self::BookingDate];

    fn collection_path(self) -> &'static str {
        match self {
            Self::Propagation => "/v1/uno/data-backfill/propagation/jobs",
            Self::FileBased => "/v1/uno/data-backfill/jobs",
            Self::BookingDate => "/v1/uno/data-backfill/bookingdate/jobs",
        }
    }

    fn resource(self) -> Resource {
        match self {
            Self::Propagation => Resource(534_010),
            Self::FileBased => Resource(534_020),
            Self::BookingDate => Resource(534_030),
        }
    }

    fn index(self) -> usize {
        match self {
            Self::Propagation => 0,
            Self::FileBased => 1,
            Self::BookingDate => 2,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JobType {
    RatePlanCharge,
    OrderLineItem,
}

impl JobType {
    fn as_str(self) -> &'static str {
        match self {
            Self::RatePlanCharge => "RatePlanCharge",
            Self::OrderLineItem => "OrderLineItem",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "RatePlanCharge" => Some(Self::RatePlanCharge),
            "OrderLineItem" => Some(Self::OrderLineItem),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FinalStatus {
    Completed,
    Failed,
    Canceled,
    Stopped,
}

impl FinalStatus {
    fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "Completed",
            Self::Failed => "Failed",
            Self::Canceled => "Canceled",
            Self::Stopped => "Stopped",
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum JobState {
    /// `Pending`, then `Processing`, then `Completed` once `run_for` has passed.
    Running {
        started: Instant,
        run_for: Duration,
    },
    /// `Stopping` for [`STOPPING_FOR`], then `Stopped`; progress frozen.
    Stopping {
        since: Instant,
        progress: u32,
    },
    Finished {
        status: FinalStatus,
        progress: u32,
    },
}

#[derive(Debug)]
struct Job {
    id: String,
    job_type: JobType,
    created_unix: u64,
    total_batches: u32,
    error_count: u32,
    state: JobState,
}

/// A job's status and progress (percent) at one instant.
struct JobView {
    status: &'static str,
    progress: u32,
}

impl Job {
    fn new(id: String, job_type: JobType, created_unix: u64, state: JobState) -> Self {
        Self {
            id,
            job_type,
            created_unix,
            total_batches: fastrand::u32(10..=60),
            error_count: 0,
            state,
        }
    }

    fn view(&self, now: Instant) -> JobView {
        match self.state {
            JobState::Running { started, run_for } => {
                let elapsed = now.saturating_duration_since(started);
                if elapsed < PENDING_FOR {
                    JobView {
                        status: "Pending",
                        progress: 0,
                    }
                } else if elapsed >= run_for {
                    JobView {
                        status: FinalStatus::Completed.as_str(),
                        progress: 100,
                    }
                } else {
                    let fraction = elapsed.as_secs_f64() / run_for.as_secs_f64().max(f64::EPSILON);
                    JobView {
                        status: "Processing",
                        // In 0..=99 by the branch above; the cast cannot truncate.
                        progress: (fraction * 100.0).clamp(0.0, 99.0) as u32,
                    }
                }
            }
            JobState::Stopping { since, progress } => JobView {
                status: if now.saturating_duration_since(since) < STOPPING_FOR {
                    "Stopping"
                } else {
                    FinalStatus::Stopped.as_str()
                },
                progress,
            },
            JobState::Finished { status, progress } => JobView {
                status: status.as_str(),
                progress,
            },
        }
    }

    /// Asks a running job to stop; a stopping or finished job keeps its status.
    fn stop(&mut self, now: Instant) {
        if let JobState::Running { .. } = self.state {
            let view = self.view(now);
            self.state = if view.progress >= 100 {
                JobState::Finished {
                    status: FinalStatus::Completed,
                    progress: 100,
                }
            } else {
                JobState::Stopping {
                    since: now,
                    progress: view.progress,
                }
            };
        }
    }

    fn json(&self, now: Instant) -> JobJson<'_> {
        let view = self.view(now);
        let finished = self.total_batches * view.progress / 100;
        // A processing job has one batch out that has not come back yet.
        let sent = match view.status {
            "Processing" => (finished + 1).min(self.total_batches),
            "Pending" => 0,
            _ => finished,
        };
        JobJson {
            id: &self.id,
            created_on: format_timestamp(self.created_unix),
            status: view.status,
            job_type: self.job_type.as_str(),
            batch_sent_count: sent,
            batch_finished_count: finished,
            error_count: self.error_count,
            progress: view.progress,
        }
    }

    fn snapshot(&self, now: Instant) -> JobSnapshot {
        JobSnapshot {
            id: self.id.clone(),
            status: self.view(now).status.to_owned(),
            job_type: self.job_type.as_str().to_owned(),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct JobJson<'a> {
    id: &'a str,
    created_on: String,
    status: &'static str,
    #[serde(rename = "type")]
    job_type: &'static str,
    batch_sent_count: u32,
    batch_finished_count: u32,
    error_count: u32,
    progress: u32,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Created<'a> {
    success: bool,
    job_id: &'a str,
}

#[derive(Serialize)]
struct JobList<'a> {
    success: bool,
    jobs: Vec<JobJson<'a>>,
}

#[derive(Serialize)]
struct OneJob<'a> {
    success: bool,
    job: JobJson<'a>,
}

/// The stop answer, in the documented field order.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct StopAccepted<'a> {
    process_id: String,
    reasons: Vec<()>,
    request_id: &'a str,
    success: bool,
}

#[derive(Default)]
struct FamilyJobs {
    jobs: HashMap<String, Job>,
    /// Job ids, oldest first.
    order: VecDeque<String>,
    idempotency: HashMap<String, String>,
}

impl FamilyJobs {
    fn insert(&mut self, job: Job) {
        while self.jobs.len() >= MAX_JOBS_PER_FAMILY {
            match self.order.pop_front() {
                Some(oldest) => {
                    self.jobs.remove(&oldest);
                }
                None => break,
            }
        }
        self.order.push_back(job.id.clone());
        self.jobs.insert(job.id.clone(), job);
    }
}

/// All jobs of all three families.
pub(crate) struct JobStore {
    families: [Mutex<FamilyJobs>; 3],
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A Zuora-looking job id: 32 lowercase hex digits.
fn new_job_id() -> String {
    format!("ff808081{}", random_hex(JOB_ID_LEN - 8))
}

impl JobStore {
    /// A store with [`SEEDED_JOBS`] jobs in each family: two running, the rest finished.
    pub(crate) fn seeded() -> Self {
        let store = Self {
            families: Default::default(),
        };
        let now = Instant::now();
        let unix = unix_now();
        const FINISHED: [FinalStatus; 8] = [
            FinalStatus::Completed,
            FinalStatus::Completed,
            FinalStatus::Failed,
            FinalStatus::Completed,
            FinalStatus::Stopped,
            FinalStatus::Completed,
            FinalStatus::Canceled,
            FinalStatus::Completed,
        ];
        for family in Family::ALL {
            let mut jobs = lock(&store.families[family.index()]);
            // Oldest first, so the list (newest first) starts with the running ones.
            for age in (0..SEEDED_JOBS).rev() {
                let job_type = if age % 3 == 2 {
                    JobType::OrderLineItem
                } else {
                    JobType::RatePlanCharge
                };
                let created_unix = unix.saturating_sub(600 + 7 * 3600 * age as u64);
                let state = match age {
                    0 | 1 => JobState::Running {
                        started: now.checked_sub(Duration::from_secs(600)).unwrap_or(now),
                        run_for: Duration::from_secs(4 * 3600),
                    },
                    _ => {
                        let status = FINISHED[age % FINISHED.len()];
                        JobState::Finished {
                            status,
                            progress: match status {
                                FinalStatus::Completed => 100,
                                _ => fastrand::u32(5..95),
                            },
                        }
                    }
                };
                let mut job = Job::new(new_job_id(), job_type, created_unix, state);
                if let JobState::Finished {
                    status: FinalStatus::Failed,
                    ..
                } = job.state
                {
                    job.error_count = fastrand::u32(1..20);
                }
                jobs.insert(job);
            }
        }
        store
    }

    /// The job with this id in any family.
    pub(crate) fn snapshot(&self, job_id: &str) -> Option<JobSnapshot> {
        let now = Instant::now();
        self.families
            .iter()
            .find_map(|family| lock(family).jobs.get(job_id).map(|job| job.snapshot(now)))
    }

    fn family(&self, family: Family) -> std::sync::MutexGuard<'_, FamilyJobs> {
        lock(&self.families[family.index()])
    }
}

/// A `/v1` request, decoded, as the job routes see it.
pub(crate) struct ApiRequest<'a> {
    pub(crate) method: &'a Method,
    pub(crate) path: &'a str,
    pub(crate) query: Option<&'a str>,
    pub(crate) headers: &'a HeaderMap,
    pub(crate) body: &'a [u8],
}

/// Answers a request for one of the job families; `None` when the path is not theirs.
pub(crate) fn route(store: &JobStore, req: &ApiRequest<'_>, ctx: &Ctx) -> Option<Reply> {
    let (family, rest) = Family::ALL.into_iter().find_map(|family| {
        let rest = req.path.strip_prefix(family.collection_path())?;
        (rest.is_empty() || rest.starts_with('/')).then_some((family, rest))
    })?;
    let rest = rest.strip_prefix('/').unwrap_or(rest);
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let reply = if rest.is_empty() {
        match *req.method {
            Method::GET => list(store, family, req.query, ctx),
            Method::POST => create(store, family, req, ctx),
            _ => method_not_allowed(family, "GET, POST", ctx),
        }
    } else if rest.contains('/') {
        return None;
    } else {
        match *req.method {
            Method::GET => get(store, family, rest, ctx),
            Method::PUT => stop(store, family, rest, req.body, ctx),
            _ => method_not_allowed(family, "GET, PUT", ctx),
        }
    };
    Some(reply)
}

fn bad_request(family: Family, category: Category, message: &str, ctx: &Ctx) -> Reply {
    Reply::error(
        StatusCode::BAD_REQUEST,
        family.resource().code(category),
        message,
        ctx,
    )
}

fn method_not_allowed(family: Family, allow: &'static str, ctx: &Ctx) -> Reply {
    Reply::error(
        StatusCode::METHOD_NOT_ALLOWED,
        family.resource().code(Category::UnsupportedMethod),
        "The HTTP method is not supported for this resource.",
        ctx,
    )
    .with_header(ALLOW, HeaderValue::from_static(allow))
}

fn check_job_id(family: Family, job_id: &str, ctx: &Ctx) -> Result<(), Reply> {
    if job_id.chars().count() == JOB_ID_LEN {
        Ok(())
    } else {
        Err(bad_request(
            family,
            Category::InvalidValue,
            "Invalid jobId: it must be exactly 32 characters.",
            ctx,
        ))
    }
}

fn list(store: &JobStore, family: Family, query: Option<&str>, ctx: &Ctx) -> Reply {
    let mut page_size = MAX_PAGE_SIZE;
    let mut page = 1usize;
    for (name, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match name.as_ref() {
            "pageSize" => match value.parse::<usize>() {
                Ok(n) if (1..=MAX_PAGE_SIZE).contains(&n) => page_size = n,
                _ => {
                    return bad_request(
                        family,
                        Category::InvalidValue,
                        "Invalid pageSize: it must be an integer from 1 to 1000.",
                        ctx,
                    );
                }
            },
            "page" => match value.parse::<usize>() {
                Ok(n) if n >= 1 => page = n,
                _ => {
                    return bad_request(
                        family,
                        Category::InvalidValue,
                        "Invalid page: it must be a positive integer.",
                        ctx,
                    );
                }
            },
            _ => {}
        }
    }
    let now = Instant::now();
    let jobs = store.family(family);
    let skip = (page - 1).saturating_mul(page_size);
    let listed = jobs
        .order
        .iter()
        .rev()
        .filter_map(|id| jobs.jobs.get(id))
        .skip(skip)
        .take(page_size)
        .map(|job| job.json(now))
        .collect();
    Reply::json(
        StatusCode::OK,
        &JobList {
            success: true,
            jobs: listed,
        },
    )
}

fn get(store: &JobStore, family: Family, job_id: &str, ctx: &Ctx) -> Reply {
    if let Err(reply) = check_job_id(family, job_id, ctx) {
        return reply;
    }
    let jobs = store.family(family);
    match jobs.jobs.get(job_id) {
        Some(job) => Reply::json(
            StatusCode::OK,
            &OneJob {
                success: true,
                job: job.json(Instant::now()),
            },
        ),
        None => Reply::error(
            StatusCode::NOT_FOUND,
            family.resource().code(Category::NotFound),
            "The job does not exist.",
            ctx,
        ),
    }
}

fn create(store: &JobStore, family: Family, req: &ApiRequest<'_>, ctx: &Ctx) -> Reply {
    let idempotency_key = match req.headers.get(&IDEMPOTENCY_KEY).map(HeaderValue::to_str) {
        None => None,
        Some(Ok(key)) if !key.is_empty() && key.len() <= MAX_IDEMPOTENCY_KEY_LEN => Some(key),
        Some(_) => {
            return bad_request(
                family,
                Category::InvalidValue,
                "Invalid Idempotency-Key: it must be 1 to 255 visible ASCII characters.",
                ctx,
            );
        }
    };
    let job_type = match parse_create_body(req.body) {
        Ok(job_type) => job_type,
        Err((category, message)) => return bad_request(family, category, message, ctx),
    };

    let mut jobs = store.family(family);
    if let Some(key) = idempotency_key
        && let Some(job_id) = jobs.idempotency.get(key)
        && jobs.jobs.contains_key(job_id)
    {
        return Reply::json(
            StatusCode::OK,
            &Created {
                success: true,
                job_id,
            },
        );
    }
    let job = Job::new(
        new_job_id(),
        job_type,
        unix_now(),
        JobState::Running {
            started: Instant::now(),
            run_for: CREATED_RUN_FOR,
        },
    );
    let reply = Reply::json(
        StatusCode::OK,
        &Created {
            success: true,
            job_id: &job.id,
        },
    );
    if let Some(key) = idempotency_key {
        if jobs.idempotency.len() >= MAX_IDEMPOTENCY_KEYS {
            jobs.idempotency.clear();
        }
        jobs.idempotency.insert(key.to_owned(), job.id.clone());
    }
    jobs.insert(job);
    reply
}

/// Validates `{"type": "RatePlanCharge"|"OrderLineItem", "batchSize": 1..=1000, "dryRun": bool}`
/// (`batchSize` and `dryRun` optional; unknown fields ignored).
fn parse_create_body(body: &[u8]) -> Result<JobType, (Category, &'static str)> {
    let value: Value = serde_json::from_slice(body).map_err(|_| {
        (
            Category::MalformedJson,
            "Malformed JSON in the request body.",
        )
    })?;
    let Some(fields) = value.as_object() else {
        return Err((
            Category::InvalidValue,
            "The request body must be a JSON object.",
        ));
    };
    let job_type = match fields.get("type") {
        None | Some(Value::Null) => {
            return Err((Category::MissingField, "Missing required field: type."));
        }
        Some(value) => value.as_str().and_then(JobType::parse).ok_or((
            Category::InvalidValue,
            "Invalid value for type: it must be RatePlanCharge or OrderLineItem.",
        ))?,
    };
    match fields.get("batchSize") {
        None | Some(Value::Null) => {}
        Some(value) => {
            let size = value.as_u64().unwrap_or(0);
            if !(1..=MAX_BATCH_SIZE).contains(&size) {
                return Err((
                    Category::InvalidValue,
                    "Invalid value for batchSize: it must be an integer from 1 to 1000.",
                ));
            }
        }
    }
    match fields.get("dryRun") {
        None | Some(Value::Null | Value::Bool(_)) => {}
        Some(_) => {
            return Err((
                Category::InvalidValue,
                "Invalid value for dryRun: it must be true or false.",
            ));
        }
    }
    Ok(job_type)
}

fn stop(store: &JobStore, family: Family, job_id: &str, body: &[u8], ctx: &Ctx) -> Reply {
    if let Err(reply) = check_job_id(family, job_id, ctx) {
        return reply;
    }
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return bad_request(
            family,
            Category::MalformedJson,
            "Malformed JSON in the request body.",
            ctx,
        );
    };
    let Some(fields) = value.as_object() else {
        return bad_request(
            family,
            Category::InvalidValue,
            "The request body must be a JSON object.",
            ctx,
        );
    };
    match fields.get("status") {
        None | Some(Value::Null) => {
            return bad_request(
                family,
                Category::MissingField,
                "Missing required field: status.",
                ctx,
            );
        }
        Some(Value::String(status)) if status == "Stopping" => {}
        Some(_) => {
            return bad_request(
                family,
                Category::InvalidValue,
                "Invalid value for status: Stopping is the only allowed value.",
                ctx,
            );
        }
    }

    let now = Instant::now();
    let mut jobs = store.family(family);
    if let Some(job) = jobs.jobs.get_mut(job_id) {
        job.stop(now);
    } else {
        // An id we never issued: take it as a job that has been running for a while.
        let mut job = Job::new(
            job_id.to_owned(),
            JobType::RatePlanCharge,
            unix_now().saturating_sub(60),
            JobState::Running {
                started: now.checked_sub(Duration::from_secs(60)).unwrap_or(now),
                run_for: Duration::from_secs(3600),
            },
        );
        job.stop(now);
        jobs.insert(job);
    }
    drop(jobs);
    Reply::json(
        StatusCode::OK,
        &StopAccepted {
            process_id: process_id(),
            reasons: Vec::new(),
            request_id: ctx.request_id.as_str(),
            success: true,
        },
    )
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) for a Unix time.
fn format_timestamp(unix: u64) -> String {
    let days = unix / 86_400;
    let secs = unix % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(format_timestamp(0), "1970-01-01 00:00:00");
        assert_eq!(format_timestamp(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(format_timestamp(1_767_338_759), "2026-01-02 07:25:59");
    }

    #[test]
    fn created_job_runs_then_stops() {
        let start = Instant::now();
        let mut job = Job::new(
            new_job_id(),
            JobType::OrderLineItem,
            0,
            JobState::Running {
                started: start,
                run_for: Duration::from_secs(10),
            },
        );
        assert_eq!(job.id.len(), 32);
        assert_eq!(job.view(start).status, "Pending");
        assert_eq!(
            job.view(start + Duration::from_secs(5)).status,
            "Processing"
        );
        assert_eq!(job.view(start + Duration::from_secs(5)).progress, 50);
        assert_eq!(
            job.view(start + Duration::from_secs(11)).status,
            "Completed"
        );
        job.stop(start + Duration::from_secs(5));
        assert_eq!(job.view(start + Duration::from_secs(5)).status, "Stopping");
        assert_eq!(job.view(start + Duration::from_secs(7)).status, "Stopped");
        assert_eq!(job.view(start + Duration::from_secs(7)).progress, 50);
    }

    #[test]
    fn finished_jobs_ignore_stop() {
        let now = Instant::now();
        let mut job = Job::new(
            new_job_id(),
            JobType::RatePlanCharge,
            0,
            JobState::Finished {
                status: FinalStatus::Failed,
                progress: 40,
            },
        );
        job.stop(now);
        assert_eq!(job.view(now).status, "Failed");
    }

    #[test]
    fn create_body_validation() {
        assert_eq!(
            parse_create_body(br#"{"type":"RatePlanCharge","batchSize":10,"dryRun":true}"#),
            Ok(JobType::RatePlanCharge)
        );
        assert_eq!(
            parse_create_body(br#"{"type":"OrderLineItem"}"#),
            Ok(JobType::OrderLineItem)
        );
        let category = |body: &[u8]| parse_create_body(body).err().map(|(c, _)| c);
        assert_eq!(category(b"{"), Some(Category::MalformedJson));
        assert_eq!(category(b"[]"), Some(Category::InvalidValue));
        assert_eq!(category(b"{}"), Some(Category::MissingField));
        assert_eq!(
            category(br#"{"type":"Invoice"}"#),
            Some(Category::InvalidValue)
        );
        assert_eq!(
            category(br#"{"type":"OrderLineItem","batchSize":0}"#),
            Some(Category::InvalidValue)
        );
        assert_eq!(
            category(br#"{"type":"OrderLineItem","batchSize":1001}"#),
            Some(Category::InvalidValue)
        );
        assert_eq!(
            category(br#"{"type":"OrderLineItem","batchSize":1.5}"#),
            Some(Category::InvalidValue)
        );
        assert_eq!(
            category(br#"{"type":"OrderLineItem","dryRun":"yes"}"#),
            Some(Category::InvalidValue)
        );
    }

    #[test]
    fn seeded_store_has_jobs_in_every_family() {
        let store = JobStore::seeded();
        for family in Family::ALL {
            let jobs = store.family(family);
            assert_eq!(jobs.jobs.len(), SEEDED_JOBS);
            let newest = jobs.order.back().and_then(|id| jobs.jobs.get(id)).unwrap();
            assert_eq!(newest.view(Instant::now()).status, "Processing");
        }
    }
}
