//! The counter counts what it should: the flagged thread, or every thread, and nothing
//! while switched off — so a no-allocation test that sees 0 means 0.

#[global_allocator]
static GLOBAL: alloc_count::CountingAlloc = alloc_count::CountingAlloc;

fn allocate() {
    drop(std::hint::black_box(vec![1u8; 64]));
}

#[test]
fn counts_this_thread_all_threads_and_nothing_when_off() {
    alloc_count::take();
    allocate();
    assert_eq!(alloc_count::take(), 0, "off: nothing counted");

    alloc_count::count_this_thread(true);
    allocate();
    alloc_count::count_this_thread(false);
    assert_eq!(alloc_count::take(), 1, "exactly our one allocation");

    // Another thread's allocations are not ours: 1000 of them there, a handful here (the
    // spawn itself allocates on this thread).
    alloc_count::count_this_thread(true);
    std::thread::spawn(|| (0..1000).for_each(|_| allocate()))
        .join()
        .unwrap();
    alloc_count::count_this_thread(false);
    let here = alloc_count::take();
    assert!(
        here < 100,
        "{here} allocations counted for the spawning thread"
    );

    alloc_count::count_all_threads(true);
    std::thread::spawn(allocate).join().unwrap();
    alloc_count::count_all_threads(false);
    assert!(
        alloc_count::take() >= 1,
        "the other thread's allocation counted"
    );
}
