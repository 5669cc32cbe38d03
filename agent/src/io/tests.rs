use super::*;

#[tokio::test]
async fn output_is_complete_after_the_writer_closes() {
    let (pio, child) = ProcessIo::pipes(false).unwrap();
    let pio = Arc::new(pio);
    let data: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
    let writer_data = data.clone();
    let writer = std::thread::spawn(move || {
        let mut f = std::fs::File::from(child.stdout);
        std::io::Write::write_all(&mut f, &writer_data).unwrap();
    });
    let (host, agent) = tokio::io::duplex(4096);
    let Ok(Attached::Now(fd)) = pio.attach(StreamKind::Stdout) else {
        panic!("stdout not attachable")
    };
    let p = pio.clone();
    let pump =
        tokio::spawn(async move { pump_output(&p, StreamKind::Stdout, fd, Some(agent)).await });
    let mut got = Vec::new();
    let mut host = host;
    tokio::io::AsyncReadExt::read_to_end(&mut host, &mut got)
        .await
        .unwrap();
    writer.join().unwrap();
    pump.await.unwrap();
    assert_eq!(got, data);
    assert!(*pio.drained[&StreamKind::Stdout].borrow());
    assert!(
        pio.attach(StreamKind::Stdout).is_err(),
        "a stream attaches once"
    );
    assert!(pio
        .attach(StreamKind::Stdin)
        .unwrap_err()
        .contains("no stdin"));
}

/// Records each write: one per send to the host.
#[derive(Clone, Default)]
struct Sends(Arc<Mutex<Vec<Vec<u8>>>>);

impl AsyncWrite for Sends {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        self.0.lock().unwrap().push(buf.to_vec());
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

#[tokio::test]
async fn small_pieces_written_while_the_pump_waits_go_in_one_send() {
    let (pio, child) = ProcessIo::pipes(false).unwrap();
    let pio = Arc::new(pio);
    let Ok(Attached::Now(fd)) = pio.attach(StreamKind::Stdout) else {
        panic!("stdout not attachable")
    };
    let mut w = std::fs::File::from(child.stdout);
    std::io::Write::write_all(&mut w, b"a").unwrap();
    let sends = Sends::default();
    let (p, s) = (pio.clone(), sends.clone());
    let pump = tokio::spawn(async move { pump_output(&p, StreamKind::Stdout, fd, Some(s)).await });
    // This runtime has one thread: once the pipe is empty, the pump has taken "a" and
    // waits [`COALESCE`] before it sends.
    loop {
        let mut unread: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int; the pipe's write end answers for the pipe.
        assert_eq!(
            unsafe { libc::ioctl(w.as_raw_fd(), libc::FIONREAD, &mut unread) },
            0
        );
        if unread == 0 {
            break;
        }
        tokio::task::yield_now().await;
    }
    std::io::Write::write_all(&mut w, b"bcd").unwrap();
    drop(w);
    pump.await.unwrap();
    assert_eq!(*sends.0.lock().unwrap(), [b"abcd".to_vec()]);
    assert!(*pio.drained[&StreamKind::Stdout].borrow());
}

#[tokio::test]
async fn an_early_tty_stream_gets_the_master_later() {
    let pio = ProcessIo::tty();
    let Ok(Attached::Later(rx)) = pio.attach(StreamKind::Tty) else {
        panic!("tty not attachable early")
    };
    assert!(
        pio.attach(StreamKind::Tty).is_err(),
        "a stream attaches once"
    );
    let (master, _other) = std::os::unix::net::UnixStream::pair().unwrap();
    pio.set_master(master.into()).unwrap();
    assert!(rx.await.is_ok());
    // A process that never runs releases its early stream.
    let pio = ProcessIo::tty();
    let Ok(Attached::Later(rx)) = pio.attach(StreamKind::Tty) else {
        panic!("tty not attachable early")
    };
    pio.abandon();
    assert!(rx.await.is_err());
}

#[tokio::test]
async fn stdin_frames_then_eof_close_the_pipe() {
    let (pio, child) = ProcessIo::pipes(true).unwrap();
    let Ok(Attached::Now(fd)) = pio.attach(StreamKind::Stdin) else {
        panic!("stdin not attachable")
    };
    let (mut host, mut agent) = tokio::io::duplex(4096);
    let pump = tokio::spawn(async move { pump_input(StreamKind::Stdin, fd, &mut agent).await });
    shoji_agent_api::stream::write_frame(&mut host, b"hello ")
        .await
        .unwrap();
    shoji_agent_api::stream::write_frame(&mut host, b"world")
        .await
        .unwrap();
    shoji_agent_api::stream::write_frame(&mut host, b"")
        .await
        .unwrap();
    assert_eq!(pump.await.unwrap(), InputEnd::Eof);
    let mut got = String::new();
    std::io::Read::read_to_string(&mut std::fs::File::from(child.stdin), &mut got).unwrap();
    assert_eq!(got, "hello world");
}
