//! NCCL, opened by hand: cudarc looks for `libnccl.so` and never for
//! `libnccl.so.2`, the only name NCCL's runtime package and pip wheel ship.
//! Five functions are all an all-reduce needs; they are resolved from the
//! library [`loader`] found (`libnccl.so.2` on the linker path, in
//! `$RLHF_CUDA_LIB_DIRS`, a CUDA install or Python's `nvidia/nccl/lib`).
//!
//! A dead peer makes NCCL wait forever, so the communicator is created
//! non-blocking and every collective is awaited by polling the stream and
//! NCCL's async error with a deadline; past it, or when `abort` is set, the
//! communicator is aborted and the call fails (it never hangs).

use super::{loader, Cuda, CudaViewMut, Dtype};
use crate::KernelError;
use libloading::{Library, Symbol};
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bytes of an `ncclUniqueId` (what rank 0 hands out through the coordinator).
pub const UNIQUE_ID_BYTES: usize = 128;

#[repr(C)]
#[derive(Clone, Copy)]
struct NcclUniqueId {
    internal: [c_char; UNIQUE_ID_BYTES],
}

type RawComm = *mut c_void;
type NcclResult = c_int;
const NCCL_SUCCESS: NcclResult = 0;
const NCCL_IN_PROGRESS: NcclResult = 7;
const NCCL_FLOAT32: c_int = 7;
const NCCL_SUM: c_int = 0;
/// `NCCL_CONFIG_UNDEF_INT`: a config field left to NCCL's default.
const CONFIG_UNDEF: c_int = i32::MIN;

/// `ncclConfig_t` as NCCL 2.17 defined it (`ncclConfig_v21700`): size, magic
/// and version, then the tunables (left undefined but `blocking`). Later
/// versions append fields and read only what `size`/`version` say is there.
#[repr(C)]
struct NcclConfig {
    size: usize,
    magic: u32,
    version: u32,
    blocking: c_int,
    cga_cluster_size: c_int,
    min_ctas: c_int,
    max_ctas: c_int,
    net_name: *const c_char,
}

/// NCCL_VERSION(2, 17, 0): the layout of [`NcclConfig`].
const CONFIG_VERSION: u32 = 21700;

struct Api {
    lib: Library,
}

impl Api {
    fn open() -> Result<Arc<Api>, KernelError> {
        let path = loader::require(loader::NCCL)?;
        // SAFETY: the library was opened successfully just above; opening it
        // again returns the same handle with its refcount raised.
        let lib = unsafe { Library::new(&path) }
            .map_err(|e| KernelError::Unavailable(format!("NCCL ({}): {e}", path.display())))?;
        Ok(Arc::new(Api { lib }))
    }

    /// A function of NCCL by name, with the signature `T`.
    ///
    /// SAFETY (callers): `T` must be the function's C signature.
    unsafe fn sym<T>(&self, name: &[u8]) -> Result<Symbol<'_, T>, KernelError> {
        self.lib.get(name).map_err(|e| {
            KernelError::Unavailable(format!(
                "NCCL lacks {}: {e}",
                String::from_utf8_lossy(&name[..name.len() - 1])
            ))
        })
    }

    fn check(&self, what: &str, r: NcclResult) -> Result<(), KernelError> {
        if r == NCCL_SUCCESS {
            return Ok(());
        }
        // SAFETY: ncclGetErrorString(int) -> const char*, a static string.
        let msg = unsafe {
            self.sym::<unsafe extern "C" fn(NcclResult) -> *const c_char>(b"ncclGetErrorString\0")
                .ok()
                .map(|f| CStr::from_ptr(f(r)).to_string_lossy().into_owned())
        }
        .unwrap_or_default();
        Err(KernelError::Unavailable(format!(
            "NCCL {what}: error {r} {msg}"
        )))
    }
}

/// A fresh NCCL unique id (rank 0 creates it; the others get it from the
/// coordinator's rendezvous).
pub fn unique_id() -> Result<Vec<u8>, KernelError> {
    let api = Api::open()?;
    let mut id = NcclUniqueId {
        internal: [0; UNIQUE_ID_BYTES],
    };
    // SAFETY: ncclGetUniqueId(ncclUniqueId*) writes 128 bytes into `id`.
    let r = unsafe {
        api.sym::<unsafe extern "C" fn(*mut NcclUniqueId) -> NcclResult>(b"ncclGetUniqueId\0")?(
            &mut id,
        )
    };
    api.check("ncclGetUniqueId", r)?;
    Ok(id.internal.iter().map(|&c| c as u8).collect())
}

/// One rank's NCCL communicator on the backend's GPU and stream.
pub struct NcclComm {
    api: Arc<Api>,
    comm: NcclCommPtr,
    cu: Cuda,
    rank: usize,
    world: usize,
    timeout: Duration,
    abort: Arc<AtomicBool>,
    broken: bool,
}

struct NcclCommPtr(RawComm);
// SAFETY: an NCCL communicator may be used from any thread as long as calls
// are not concurrent; NcclComm is not Sync and every call takes &mut self.
unsafe impl Send for NcclCommPtr {}

impl NcclComm {
    /// Join the communicator of `world` ranks named by `id` (rank 0's
    /// [`unique_id`]). Waits for every rank up to `timeout`, or until `abort`.
    pub fn new(
        cu: &Cuda,
        rank: usize,
        world: usize,
        id: &[u8],
        timeout: Duration,
        abort: Arc<AtomicBool>,
    ) -> Result<Self, KernelError> {
        if id.len() != UNIQUE_ID_BYTES {
            return Err(KernelError::Unavailable(format!(
                "NCCL unique id has {} bytes, expected {UNIQUE_ID_BYTES} (did rank 0 run on CUDA?)",
                id.len()
            )));
        }
        let api = Api::open()?;
        let mut raw = NcclUniqueId {
            internal: [0; UNIQUE_ID_BYTES],
        };
        for (d, &s) in raw.internal.iter_mut().zip(id) {
            *d = s as c_char;
        }
        cu.context()
            .bind_to_thread()
            .map_err(|e| cu.driver_err("binding the context", e))?;
        let mut config = NcclConfig {
            size: std::mem::size_of::<NcclConfig>(),
            magic: 0xcafe_beef,
            version: CONFIG_VERSION,
            blocking: 0,
            cga_cluster_size: CONFIG_UNDEF,
            min_ctas: CONFIG_UNDEF,
            max_ctas: CONFIG_UNDEF,
            net_name: std::ptr::null(),
        };
        let have = nccl_version(&api)?;
        if have < CONFIG_VERSION {
            return Err(KernelError::Unavailable(format!(
                "NCCL {have} is older than 2.17, which non-blocking communicators need"
            )));
        }
        let mut comm: RawComm = std::ptr::null_mut();
        // SAFETY: ncclCommInitRankConfig(ncclComm_t*, int nranks, ncclUniqueId
        // (by value), int rank, ncclConfig_t*); `comm` receives the handle.
        let r = unsafe {
            api.sym::<unsafe extern "C" fn(
                *mut RawComm,
                c_int,
                NcclUniqueId,
                c_int,
                *mut NcclConfig,
            ) -> NcclResult>(b"ncclCommInitRankConfig\0")?(
                &mut comm,
                world as c_int,
                raw,
                rank as c_int,
                &mut config,
            )
        };
        if r != NCCL_IN_PROGRESS {
            api.check("ncclCommInitRankConfig", r)?;
        }
        let mut me = NcclComm {
            api,
            comm: NcclCommPtr(comm),
            cu: cu.clone(),
            rank,
            world,
            timeout,
            abort,
            broken: false,
        };
        me.wait("joining the communicator", false)?;
        Ok(me)
    }

    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn world_size(&self) -> usize {
        self.world
    }

    /// In place: buf ← Σ over ranks of buf (f32 only: gradients are f32).
    pub fn all_reduce_sum(&mut self, buf: CudaViewMut<'_>) -> Result<(), KernelError> {
        if self.broken {
            return Err(KernelError::Unavailable(
                "NCCL communicator was aborted".into(),
            ));
        }
        if buf.dtype != Dtype::F32 {
            return Err(KernelError::Unavailable(format!(
                "NCCL all-reduce takes f32 buffers, got {}",
                buf.dtype.name()
            )));
        }
        let stream = self.cu.stream().cu_stream();
        // SAFETY: ncclAllReduce(sendbuff, recvbuff, count, datatype, op, comm,
        // stream): in place on `buf`, a live range of `buf.len` f32 on this
        // communicator's GPU, queued on the backend's stream.
        let r = unsafe {
            self.api.sym::<unsafe extern "C" fn(
                *const c_void,
                *mut c_void,
                usize,
                c_int,
                c_int,
                RawComm,
                *mut c_void,
            ) -> NcclResult>(b"ncclAllReduce\0")?(
                buf.ptr as *const c_void,
                buf.ptr as *mut c_void,
                buf.len,
                NCCL_FLOAT32,
                NCCL_SUM,
                self.comm.0,
                stream as *mut c_void,
            )
        };
        if r != NCCL_IN_PROGRESS {
            if let Err(e) = self.api.check("ncclAllReduce", r) {
                // The communicator is not used again: abort it, so that Drop
                // does not ncclCommDestroy (which waits) one in error.
                self.abort_comm();
                return Err(e);
            }
        }
        self.wait("all-reduce", true)
    }

    /// Poll until the communicator (and, with `stream`, the stream) is done;
    /// abort on an NCCL error, the deadline or the abort flag.
    fn wait(&mut self, what: &str, stream: bool) -> Result<(), KernelError> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let mut async_err: NcclResult = NCCL_SUCCESS;
            // SAFETY: ncclCommGetAsyncError(ncclComm_t, ncclResult_t*).
            let r = unsafe {
                self.api
                    .sym::<unsafe extern "C" fn(RawComm, *mut NcclResult) -> NcclResult>(
                        b"ncclCommGetAsyncError\0",
                    )?(self.comm.0, &mut async_err)
            };
            if let Err(e) = self.api.check("ncclCommGetAsyncError", r) {
                self.abort_comm();
                return Err(e);
            }
            if async_err != NCCL_SUCCESS && async_err != NCCL_IN_PROGRESS {
                let e = self.api.check(what, async_err);
                self.abort_comm();
                return e;
            }
            let done = async_err == NCCL_SUCCESS
                && (!stream || {
                    // SAFETY: querying the backend's own live stream.
                    let q =
                        unsafe { cudarc::driver::sys::cuStreamQuery(self.cu.stream().cu_stream()) };
                    match q {
                        cudarc::driver::sys::CUresult::CUDA_SUCCESS => true,
                        cudarc::driver::sys::CUresult::CUDA_ERROR_NOT_READY => false,
                        other => {
                            self.abort_comm();
                            return Err(KernelError::Unavailable(format!(
                                "{what}: CUDA {other:?}"
                            )));
                        }
                    }
                });
            if done {
                return Ok(());
            }
            if self.abort.load(Ordering::SeqCst) || Instant::now() > deadline {
                self.abort_comm();
                return Err(KernelError::Unavailable(format!(
                    "NCCL {what}: no progress within {:?} (a peer is gone?) or aborted; communicator aborted",
                    self.timeout
                )));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn abort_comm(&mut self) {
        if self.broken {
            return;
        }
        self.broken = true;
        // SAFETY: ncclCommAbort(ncclComm_t) frees the communicator; it is not
        // used again (broken = true).
        unsafe {
            if let Ok(f) = self
                .api
                .sym::<unsafe extern "C" fn(RawComm) -> NcclResult>(b"ncclCommAbort\0")
            {
                f(self.comm.0);
            }
        }
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        if self.broken {
            return;
        }
        // SAFETY: ncclCommDestroy(ncclComm_t) after every queued collective
        // finished (each call waited for its stream).
        unsafe {
            if let Ok(f) = self
                .api
                .sym::<unsafe extern "C" fn(RawComm) -> NcclResult>(b"ncclCommDestroy\0")
            {
                f(self.comm.0);
            }
        }
    }
}

/// NCCL_VERSION_CODE of the loaded library (the config struct's `version`).
fn nccl_version(api: &Api) -> Result<u32, KernelError> {
    let mut v: c_int = 0;
    // SAFETY: ncclGetVersion(int*).
    let r = unsafe {
        api.sym::<unsafe extern "C" fn(*mut c_int) -> NcclResult>(b"ncclGetVersion\0")?(&mut v)
    };
    api.check("ncclGetVersion", r)?;
    Ok(v as u32)
}
