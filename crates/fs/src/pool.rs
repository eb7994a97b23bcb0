//! A few threads for operations that wait on the disk (fsync), so that slow calls do not
//! stall the request loop behind them. A call runs on the request thread that received it
//! while another request thread stays free, and comes here only beyond that (see
//! `FilterFs::offload`).
//!
//! The request loop runs on a handful of threads (4 by default): with 1, the disk waits of
//! create and unlink serialise (bench/fs.sh's metadata workload: 13.5x native time with 1
//! thread, 9.6x with 4; see bench/RESULTS.md).

use std::sync::mpsc::{sync_channel, SyncSender};
use std::thread::JoinHandle;

use parking_lot::Mutex;

type Job = Box<dyn FnOnce() + Send>;

pub struct BlockingPool {
    sender: Mutex<Option<SyncSender<Job>>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

impl BlockingPool {
    pub fn new(threads: usize) -> Self {
        let (sender, receiver) = sync_channel::<Job>(1024);
        let receiver = std::sync::Arc::new(Mutex::new(receiver));
        let workers = (0..threads.max(1))
            .filter_map(|i| {
                let receiver = receiver.clone();
                std::thread::Builder::new()
                    .name(format!("fs-blocking-{i}"))
                    .spawn(move || loop {
                        let job = receiver.lock().recv();
                        match job {
                            Ok(job) => job(),
                            Err(_) => break,
                        }
                    })
                    .ok()
            })
            .collect();
        BlockingPool {
            sender: Mutex::new(Some(sender)),
            workers: Mutex::new(workers),
        }
    }

    /// Runs `job` on a pool thread, or right here if the pool is gone.
    pub fn run(&self, job: impl FnOnce() + Send + 'static) {
        let sender = self.sender.lock().clone();
        match sender {
            Some(sender) => {
                if let Err(err) = sender.send(Box::new(job)) {
                    (err.0)();
                }
            }
            None => job(),
        }
    }

    /// Finishes queued jobs and stops the threads.
    pub fn shutdown(&self) {
        drop(self.sender.lock().take());
        for worker in self.workers.lock().drain(..) {
            let _ = worker.join();
        }
    }
}
