// Package cniapi is the protocol between the divert-cni plugin and the node agent: JSON
// over HTTP on a unix socket. It has no Kubernetes dependencies, so the plugin binary,
// which the container runtime executes for every pod, stays small.
package cniapi

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
)

// Path is the agent's endpoint for the plugin.
const Path = "/v1/cni"

// Request is what the CNI plugin sends for ADD and DEL.
type Request struct {
	Command      string   `json:"command"` // "ADD" or "DEL"
	Netns        string   `json:"netns"`
	PodNamespace string   `json:"podNamespace"`
	PodName      string   `json:"podName"`
	PodUID       string   `json:"podUid"`
	IPs          []string `json:"ips,omitempty"`
}

// Response tells the plugin what happened.
type Response struct {
	Captured bool   `json:"captured"`
	Reason   string `json:"reason"`
	Error    string `json:"error,omitempty"`
}

// Call sends one request to the agent's socket (used by the CNI plugin).
func Call(ctx context.Context, socket string, req Request) (Response, error) {
	body, _ := json.Marshal(req)
	// One connection per call: a Transport kept per call would keep an idle connection
	// (and a goroutine on each side) open for every call a long-lived caller makes.
	client := &http.Client{Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", socket)
		},
	}}
	hreq, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://divert"+Path, bytes.NewReader(body))
	if err != nil {
		return Response{}, err
	}
	res, err := client.Do(hreq)
	if err != nil {
		return Response{}, err
	}
	defer res.Body.Close()
	if res.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(res.Body)
		return Response{}, fmt.Errorf("agent: %s: %s", res.Status, strings.TrimSpace(string(msg)))
	}
	var resp Response
	if err := json.NewDecoder(res.Body).Decode(&resp); err != nil {
		return Response{}, err
	}
	if resp.Error != "" {
		return resp, errors.New(resp.Error)
	}
	return resp, nil
}
