package node

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"

	"github.com/meshdivert/divert/node/cniapi"
)

// Serve answers the CNI plugin on a unix socket only root can use, until ctx ends.
func (a *Agent) Serve(ctx context.Context, socket string) error {
	if err := os.MkdirAll(filepath.Dir(socket), 0o700); err != nil {
		return err
	}
	os.Remove(socket) // a stale socket from a previous agent
	ln, err := net.Listen("unix", socket)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", socket, err)
	}
	if err := os.Chmod(socket, 0o600); err != nil {
		ln.Close()
		return err
	}
	ln = rootPeersOnly{ln.(*net.UnixListener), a.log()}
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+cniapi.Path, func(w http.ResponseWriter, r *http.Request) {
		var req Request
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		var resp Response
		switch req.Command {
		case "ADD":
			resp, err = a.Add(r.Context(), req)
		case "DEL":
			resp, err = a.Del(r.Context(), req)
		default:
			err = fmt.Errorf("unknown command %q", req.Command)
		}
		if err != nil {
			resp.Error = err.Error()
			a.log().Error("cni "+req.Command, "pod", req.PodNamespace+"/"+req.PodName, "err", err)
		}
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(resp)
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		<-ctx.Done()
		srv.Close()
	}()
	err = srv.Serve(ln)
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return err
}

// rootPeersOnly hands out only connections whose peer is root (uid 0 in the agent's user
// namespace), as the kernel recorded it at connect (SO_PEERCRED). The socket's mode (0600)
// is the first guard; this one holds when the socket file is exposed anyway (a hostPath
// mount into a pod, a chmod): root in a pod's user namespace is another uid here. Checked
// as a uid, not capabilities: a peer's capabilities cannot be read without a race on its pid.
type rootPeersOnly struct {
	*net.UnixListener
	log *slog.Logger
}

func (l rootPeersOnly) Accept() (net.Conn, error) {
	for {
		c, err := l.UnixListener.AcceptUnix()
		if err != nil {
			return nil, err
		}
		cred, err := peerCred(c)
		if err == nil && cred.Uid == 0 {
			return c, nil
		}
		msg := "the divert agent serves root only"
		if err != nil {
			l.log.Warn("refused a connection on the CNI socket: no peer credentials", "err", err)
		} else {
			l.log.Warn("refused a connection on the CNI socket from a non-root peer", "uid", cred.Uid, "pid", cred.Pid)
			msg += fmt.Sprintf(", not uid %d", cred.Uid)
		}
		go refuse(c, msg)
	}
}

// refuse answers one HTTP 403, so the client's error says why instead of "EOF", and reads
// what the client sends until it is done (a close before its request is written would give
// it EPIPE instead), for a second at most.
func refuse(c *net.UnixConn, msg string) {
	defer c.Close()
	c.SetDeadline(time.Now().Add(time.Second))
	fmt.Fprintf(c, "HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s\n", len(msg)+1, msg)
	c.CloseWrite()
	io.Copy(io.Discard, io.LimitReader(c, 1<<20))
}

func peerCred(c *net.UnixConn) (*unix.Ucred, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	var cred *unix.Ucred
	var credErr error
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return nil, err
	}
	return cred, credErr
}
