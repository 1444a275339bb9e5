package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Measure keys, in table order.
const (
	mBulkMBs     = "bulk_mbs"
	mBulkCPU     = "bulk_cpu_per_gb"
	mClosed16    = "closed16_rps"
	mClosed64    = "closed64_rps"
	mUpNew       = "closed64_upstream_new_per_1000"
	mGwUpNew     = "closed64_gw_metric_per_1000"
	mClosed256   = "closed256_rps"
	mUpNew256    = "closed256_upstream_new_per_1000"
	mGwUpNew256  = "closed256_gw_metric_per_1000"
	mOpenCPU     = "open_cpu_per_1000"
	mOpenP50     = "open_p50_us"
	mOpenP99     = "open_p99_us"
	mOpenAddP50  = "open_added_p50_us"
	mOpenAddP99  = "open_added_p99_us"
	mOtlpRatio   = "otlp_on_off_ratio"
	mNewConnRate = "newconn_per_s"
	mNewConnCPU  = "newconn_cpu_ms"
	mIdleRSS     = "idle_rss_kib"
	gatewayName  = "egress-gateway"
	gwOtlpName   = "egress-gateway+otlp"
	smokeName    = "Smokescreen"
	ghostName    = "ghostunnel"
	directName   = "direct"
)

type sample struct {
	Round   int     `json:"round"`
	Measure string  `json:"measure"`
	System  string  `json:"system"`
	Value   float64 `json:"value"`
}

type runner struct {
	cl          *client
	control     string
	duration    time.Duration
	bulkBytes   int64
	idle        int
	rate        int
	samples     []sample
	out         io.Writer
	errors      map[string]int
	round       int
	openLatency map[string][2]float64 // p50, p99 of this round, for the added latency
	only        map[string]bool       // the measures to run; empty: all
}

// runs reports whether measure group g (bulk, closed, open, newconn, idle) is to run.
func (r *runner) runs(g string) bool { return len(r.only) == 0 || r.only[g] }

func (r *runner) record(measure, sys string, v float64) {
	s := sample{Round: r.round, Measure: measure, System: sys, Value: v}
	r.samples = append(r.samples, s)
	if r.out != nil {
		b, _ := json.Marshal(s)
		fmt.Fprintln(r.out, string(b))
	}
}

func parseSystem(name, kind, spec string) (*system, error) {
	if spec == "" {
		return nil, nil
	}
	p := strings.Split(spec, ",")
	if len(p) < 2 {
		return nil, fmt.Errorf("%s: want ADDR,PID[,ADMIN_URL], got %q", name, spec)
	}
	pid, err := strconv.Atoi(p[1])
	if err != nil {
		return nil, fmt.Errorf("%s: bad pid %q", name, p[1])
	}
	s := &system{name: name, kind: kind, addr: p[0], pid: pid}
	if len(p) > 2 {
		s.admin = p[2]
	}
	return s, nil
}

// cmdRun runs -rounds rounds (numbered from -first-round, which sets the order) after
// a short warm-up, and appends every figure to -raw as a JSON line; `report` turns
// that file into the table. The proxies' processes are best fresh for each call: the
// idle-tunnel memory figure of a process that held as many tunnels before is only what
// its allocator did not keep.
func cmdRun(args []string) error {
	fs := flag.NewFlagSet("run", flag.ExitOnError)
	upstream := fs.String("upstream", "", "upstream host:port")
	control := fs.String("upstream-control", "", "upstream stats host:port")
	certs := fs.String("certs", "", "directory of ca.pem, client.pem, client.key")
	gw := fs.String("gateway", "", "ADDR,PID,ADMIN_URL of egress-gateway")
	gwOtlp := fs.String("gateway-otlp", "", "ADDR,PID,ADMIN_URL of egress-gateway exporting spans")
	smoke := fs.String("smokescreen", "", "ADDR,PID of Smokescreen")
	ghost := fs.String("ghostunnel", "", "ADDR,PID of ghostunnel")
	rounds := fs.Int("rounds", 1, "rounds")
	first := fs.Int("first-round", 1, "number of the first round")
	duration := fs.Duration("duration", 4*time.Second, "length of each timed run")
	bulk := fs.Int64("bulk-bytes", 200_000_000, "bytes of the bulk download")
	idle := fs.Int("idle-tunnels", 1000, "idle tunnels for the RSS measure")
	rate := fs.Int("rate", 1000, "open-loop request rate")
	outPath := fs.String("raw", "", "file the samples are appended to (JSON lines)")
	only := fs.String("only", "", "comma-separated measures to run (bulk, closed, open, newconn, idle); empty: all")
	fs.Parse(args)
	if *upstream == "" || *control == "" || *certs == "" || *outPath == "" {
		return errors.New("-upstream, -upstream-control, -certs and -raw are required")
	}
	cl, err := newClient(*upstream, *certs)
	if err != nil {
		return err
	}
	var systems []*system
	systems = append(systems, &system{name: directName, kind: "direct"})
	for _, x := range []struct{ name, kind, spec string }{
		{gatewayName, "proxy", *gw}, {smokeName, "proxy", *smoke}, {ghostName, "tunnel", *ghost},
	} {
		s, err := parseSystem(x.name, x.kind, x.spec)
		if err != nil {
			return err
		}
		if s != nil {
			systems = append(systems, s)
		}
	}
	otlpSys, err := parseSystem(gwOtlpName, "proxy", *gwOtlp)
	if err != nil {
		return err
	}
	f, err := os.OpenFile(*outPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	defer f.Close()
	r := &runner{cl: cl, control: *control, duration: *duration, bulkBytes: *bulk, idle: *idle,
		rate: *rate, errors: map[string]int{}, out: f, only: map[string]bool{}}
	for _, g := range strings.Split(*only, ",") {
		switch g = strings.TrimSpace(g); g {
		case "":
		case "bulk", "closed", "open", "newconn", "idle":
			r.only[g] = true
		default:
			return fmt.Errorf("-only: unknown measure %q (bulk, closed, open, newconn, idle)", g)
		}
	}
	for _, s := range append(slices.Clone(systems), otlpSys) {
		if s == nil {
			continue
		}
		if _, err := r.closedLoop(s, 16, 500*time.Millisecond); err != nil {
			return fmt.Errorf("warm-up of %s: %w", s.name, err)
		}
	}
	for round := *first; round < *first+*rounds; round++ {
		r.round = round
		// Rotate the order each round, so no system always runs first or last.
		k := (round - 1) % len(systems)
		order := append(slices.Clone(systems[k:]), systems[:k]...)
		logf("round %d: %s", round, names(order))
		if err := r.oneRound(order, otlpSys); err != nil {
			return err
		}
	}
	if otlpSys != nil {
		for _, m := range []string{"egress_otlp_spans_exported_total", "egress_otlp_spans_dropped_total"} {
			if v, err := metric(otlpSys.admin+"/metrics", m); err == nil {
				r.record(m, gwOtlpName, v)
			}
		}
	}
	for name, n := range r.errors {
		r.record("errors", name, float64(n))
	}
	return nil
}

// cmdReport prints the table from the samples of one or more `run` calls.
func cmdReport(args []string) error {
	fs := flag.NewFlagSet("report", flag.ExitOnError)
	raw := fs.String("raw", "", "samples file")
	duration := fs.Duration("duration", 4*time.Second, "length of each timed run")
	bulk := fs.Int64("bulk-bytes", 200_000_000, "bytes of the bulk download")
	idle := fs.Int("idle-tunnels", 1000, "idle tunnels for the RSS measure")
	rate := fs.Int("rate", 1000, "open-loop request rate")
	sink := fs.String("otlp-sink", "", "base URL of the OTLP sink, for its span count")
	fs.Parse(args)
	b, err := os.ReadFile(*raw)
	if err != nil {
		return err
	}
	r := &runner{duration: *duration, bulkBytes: *bulk, idle: *idle, rate: *rate, errors: map[string]int{}}
	rounds := map[int]bool{}
	has := map[string]bool{}
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		var s sample
		if err := json.Unmarshal([]byte(line), &s); err != nil {
			return fmt.Errorf("%s: %w", *raw, err)
		}
		r.samples = append(r.samples, s)
		rounds[s.Round] = true
		has[s.System] = true
		if s.Measure == "errors" {
			r.errors[s.System] += int(s.Value)
		}
	}
	var notes []string
	if has[gwOtlpName] {
		sum := func(m string) float64 {
			t := 0.0
			for _, v := range r.values(m, gwOtlpName) {
				t += v
			}
			return t
		}
		notes = append(notes, fmt.Sprintf("Span export: the gateway counted %.0f spans exported, %.0f dropped",
			sum("egress_otlp_spans_exported_total"), sum("egress_otlp_spans_dropped_total")))
		if *sink != "" {
			if resp, err := http.Get(*sink + "/stats"); err == nil {
				b, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if f := strings.Fields(string(b)); len(f) == 2 {
					notes[0] += fmt.Sprintf("; the OTLP sink received %s spans in %s requests", f[1], f[0])
				}
			}
		}
		notes[0] += "."
	}
	r.report(has, len(rounds), notes)
	return nil
}

func names(ss []*system) string {
	var n []string
	for _, s := range ss {
		n = append(n, s.name)
	}
	return strings.Join(n, ", ")
}

func logf(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "%s  %s\n", time.Now().Format("15:04:05"), fmt.Sprintf(format, a...))
}

func (r *runner) oneRound(order []*system, otlpSys *system) error {
	// 0. Idle tunnels, first, while the proxies are fresh: memory that earlier load
	// grew and freed would otherwise take the tunnels and hide what they cost.
	for _, s := range order {
		if !r.runs("idle") {
			break
		}
		if s.kind == "direct" {
			continue
		}
		if err := r.idleTunnels(s); err != nil {
			return fmt.Errorf("idle tunnels via %s: %w", s.name, err)
		}
	}
	// 1. Bulk download through one tunnel.
	for _, s := range order {
		if !r.runs("bulk") {
			break
		}
		if err := r.bulk(s); err != nil {
			return fmt.Errorf("bulk download via %s: %w", s.name, err)
		}
	}
	// 2. Closed loop, 16 and 64 keep-alive connections; the gateway with span export
	// runs right after the gateway, so the on/off ratio compares neighbours.
	for _, s := range order {
		if !r.runs("closed") {
			break
		}
		res, err := r.closedLoop(s, 16, r.duration)
		if err != nil {
			return fmt.Errorf("closed loop (16) via %s: %w", s.name, err)
		}
		r.record(mClosed16, s.name, res.rps)
		if s.name == gatewayName && otlpSys != nil {
			// off, on, on, off, off, on, on, off in half-length runs: the machine's
			// load drifts by more than export costs between two runs, and the finer
			// the alternation, the more of that drift cancels out.
			var on, off []float64
			var runs []string
			for i, sys := range []*system{s, otlpSys, otlpSys, s, s, otlpSys, otlpSys, s} {
				res, err := r.closedLoop(sys, 16, r.duration/2)
				if err != nil {
					return fmt.Errorf("closed loop (16) via %s (%d): %w", sys.name, i, err)
				}
				if sys == otlpSys {
					on = append(on, res.rps)
					runs = append(runs, fmt.Sprintf("on %.0f", res.rps))
				} else {
					off = append(off, res.rps)
					runs = append(runs, fmt.Sprintf("off %.0f", res.rps))
				}
			}
			logf("OTLP export, req/s: %s", strings.Join(runs, ", "))
			r.record(mClosed16, otlpSys.name, mean(on))
			r.record(mOtlpRatio, gatewayName, mean(on)/mean(off))
		}
	}
	// 64 and 256 connections: the upstream pool must hold as many idle connections
	// as there are concurrent agents, or every round dials again.
	for _, many := range []struct {
		conns               int
		rps, upNew, gwUpNew string
	}{{64, mClosed64, mUpNew, mGwUpNew}, {256, mClosed256, mUpNew256, mGwUpNew256}} {
		for _, s := range order {
			if !r.runs("closed") {
				break
			}
			res, err := r.closedLoop(s, many.conns, r.duration)
			if err != nil {
				return fmt.Errorf("closed loop (%d) via %s: %w", many.conns, s.name, err)
			}
			r.record(many.rps, s.name, res.rps)
			if s.kind != "direct" {
				r.record(many.upNew, s.name, res.upstreamNew/float64(res.requests)*1000)
			}
			if s.admin != "" {
				r.record(many.gwUpNew, s.name, res.gwUpstreamNew/float64(res.requests)*1000)
			}
		}
	}
	// 3. Open loop at a fixed rate.
	r.openLatency = map[string][2]float64{}
	for _, s := range order {
		if !r.runs("open") {
			break
		}
		if err := r.openLoop(s); err != nil {
			return fmt.Errorf("open loop via %s: %w", s.name, err)
		}
	}
	if d, ok := r.openLatency[directName]; ok {
		for name, l := range r.openLatency {
			if name != directName {
				r.record(mOpenAddP50, name, l[0]-d[0])
				r.record(mOpenAddP99, name, l[1]-d[1])
			}
		}
	}
	// 5. New connections.
	for _, s := range order {
		if !r.runs("newconn") {
			break
		}
		if err := r.newConns(s, 16); err != nil {
			return fmt.Errorf("new connections via %s: %w", s.name, err)
		}
	}
	return nil
}

func (r *runner) bulk(s *system) error {
	h, err := r.cl.tunnel(s)
	if err != nil {
		return err
	}
	defer h.c.Close()
	var cpu0 float64
	if s.pid != 0 {
		if cpu0, err = cpuSeconds(s.pid); err != nil {
			return err
		}
	}
	secs, err := h.bulk(r.bulkBytes)
	if err != nil {
		return err
	}
	r.record(mBulkMBs, s.name, float64(r.bulkBytes)/1e6/secs)
	if s.pid != 0 {
		cpu1, err := cpuSeconds(s.pid)
		if err != nil {
			return err
		}
		r.record(mBulkCPU, s.name, (cpu1-cpu0)/(float64(r.bulkBytes)/1e9))
	}
	return nil
}

type loopResult struct {
	rps           float64
	requests      int
	upstreamNew   float64
	gwUpstreamNew float64
}

// openConns opens n connections with open, 16 at a time.
func openConns(n int, open func() (*hconn, error)) ([]*hconn, error) {
	hs := make([]*hconn, n)
	var wg sync.WaitGroup
	var firstErr error
	var mu sync.Mutex
	sem := make(chan struct{}, 16)
	for i := range hs {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			h, err := open()
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				if firstErr == nil {
					firstErr = err
				}
				return
			}
			hs[i] = h
		}()
	}
	wg.Wait()
	if firstErr != nil {
		closeAll(hs)
		return nil, firstErr
	}
	return hs, nil
}

func closeAll(hs []*hconn) {
	for _, h := range hs {
		if h != nil {
			h.c.Close()
		}
	}
}

// primedConns opens n keep-alive connections for small GETs and sends one request on
// all of them at once: every connection is then set up end to end (the proxies' pools
// hold as many upstream connections as there are agent connections), and what follows
// is steady-state keep-alive traffic.
func (r *runner) primedConns(s *system, n int) ([]*hconn, error) {
	hs, err := openConns(n, func() (*hconn, error) { return r.cl.requester(s) })
	if err != nil {
		return nil, err
	}
	errs := make(chan error, n)
	for _, h := range hs {
		go func() { errs <- h.get() }()
	}
	for range hs {
		if e := <-errs; e != nil && err == nil {
			err = e
		}
	}
	if err != nil {
		closeAll(hs)
		return nil, err
	}
	return hs, nil
}

func (r *runner) closedLoop(s *system, conns int, d time.Duration) (loopResult, error) {
	hs, err := r.primedConns(s, conns)
	if err != nil {
		return loopResult{}, err
	}
	defer closeAll(hs)
	// A moment of the same load first, uncounted: the proxy's upstream pool grows to
	// the number of requests in flight, which one request per connection does not reach.
	// What is counted after that is churn, not growth.
	if _, failed, err := hammer(hs, time.Now().Add(min(d/4, time.Second))); failed == conns {
		return loopResult{}, fmt.Errorf("warm-up: every connection failed: %v", err)
	}
	up0, err := upstreamConns(r.control)
	if err != nil {
		return loopResult{}, err
	}
	var gw0 float64
	if s.admin != "" {
		if gw0, err = metric(s.admin+"/metrics", "egress_upstream_connections_total"); err != nil {
			return loopResult{}, err
		}
	}
	start := time.Now()
	done, f, firstErr := hammer(hs, start.Add(d))
	elapsed := time.Since(start)
	res := loopResult{requests: done}
	res.rps = float64(res.requests) / elapsed.Seconds()
	if f > 0 {
		r.errors[s.name] += f
		if f == conns {
			return res, fmt.Errorf("every connection failed: %v", firstErr)
		}
		logf("%s: %d of %d connections failed (%v)", s.name, f, conns, firstErr)
	}
	up1, err := upstreamConns(r.control)
	if err != nil {
		return res, err
	}
	res.upstreamNew = up1 - up0
	if s.admin != "" {
		gw1, err := metric(s.admin+"/metrics", "egress_upstream_connections_total")
		if err != nil {
			return res, err
		}
		res.gwUpstreamNew = gw1 - gw0
	}
	return res, nil
}

// hammer sends requests back to back on every connection until the deadline: the
// requests done, the connections that failed and the first error.
func hammer(hs []*hconn, until time.Time) (int, int, error) {
	var done, failed atomic.Int64
	var firstErr atomic.Value
	var wg sync.WaitGroup
	for _, h := range hs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(until) {
				if err := h.get(); err != nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, err)
					return
				}
				done.Add(1)
			}
		}()
	}
	wg.Wait()
	err, _ := firstErr.Load().(error)
	return int(done.Load()), int(failed.Load()), err
}

func (r *runner) openLoop(s *system) error {
	const conns = 64
	hs, err := r.primedConns(s, conns)
	if err != nil {
		return err
	}
	defer closeAll(hs)
	n := int(float64(r.rate) * r.duration.Seconds())
	interval := time.Second / time.Duration(r.rate)
	jobs := make(chan time.Time, n)
	lat := make([][]float64, conns)
	var failed atomic.Int64
	var firstErr atomic.Value
	var cpu0 float64
	if s.pid != 0 {
		if cpu0, err = cpuSeconds(s.pid); err != nil {
			return err
		}
	}
	var wg sync.WaitGroup
	for i, h := range hs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for t := range jobs {
				if err := h.get(); err != nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, err)
					break
				}
				// From the time the request was due: a backlog counts.
				lat[i] = append(lat[i], float64(time.Since(t).Microseconds()))
			}
			for range jobs {
				failed.Add(1) // leaves the rest to the others
				break
			}
		}()
	}
	start := time.Now().Add(5 * time.Millisecond)
	for i := 0; i < n; i++ {
		due := start.Add(time.Duration(i) * interval)
		if w := time.Until(due); w > 0 {
			time.Sleep(w)
		}
		jobs <- due
	}
	close(jobs)
	wg.Wait()
	var all []float64
	for _, l := range lat {
		all = append(all, l...)
	}
	if f := failed.Load(); f > 0 {
		r.errors[s.name] += int(f)
		logf("%s: open loop: %d requests failed (%v)", s.name, f, firstErr.Load())
	}
	if len(all) < n/2 {
		return fmt.Errorf("only %d of %d requests answered", len(all), n)
	}
	sort.Float64s(all)
	p50, p99 := pct(all, 0.50), pct(all, 0.99)
	r.record(mOpenP50, s.name, p50)
	r.record(mOpenP99, s.name, p99)
	r.openLatency[s.name] = [2]float64{p50, p99}
	if s.pid != 0 {
		cpu1, err := cpuSeconds(s.pid)
		if err != nil {
			return err
		}
		r.record(mOpenCPU, s.name, (cpu1-cpu0)/float64(len(all))*1000)
	}
	return nil
}

func pct(sorted []float64, p float64) float64 {
	if len(sorted) == 0 {
		return math.NaN()
	}
	return sorted[int(math.Round(float64(len(sorted)-1)*p))]
}

// newConns: each of `workers` loops new connection (mTLS), CONNECT, GET, close.
func (r *runner) newConns(s *system, workers int) error {
	var cpu0 float64
	var err error
	if s.pid != 0 {
		if cpu0, err = cpuSeconds(s.pid); err != nil {
			return err
		}
	}
	var done, failed atomic.Int64
	var firstErr atomic.Value
	start := time.Now()
	until := start.Add(r.duration)
	var wg sync.WaitGroup
	for i := 0; i < workers; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(until) {
				h, err := r.cl.tunnel(s)
				if err == nil {
					err = h.get()
					h.c.Close()
				}
				if err != nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, err)
					time.Sleep(10 * time.Millisecond)
					continue
				}
				done.Add(1)
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	if f := failed.Load(); f > 0 {
		r.errors[s.name] += int(f)
		logf("%s: new connections: %d failed (%v)", s.name, f, firstErr.Load())
	}
	if done.Load() == 0 {
		return fmt.Errorf("no connection succeeded: %v", firstErr.Load())
	}
	r.record(mNewConnRate, s.name, float64(done.Load())/elapsed.Seconds())
	if s.pid != 0 {
		cpu1, err := cpuSeconds(s.pid)
		if err != nil {
			return err
		}
		r.record(mNewConnCPU, s.name, (cpu1-cpu0)/float64(done.Load())*1000)
	}
	return nil
}

// idleTunnels opens r.idle tunnels, sends one small request on each, and leaves them
// idle: (RSS after - RSS before) / N.
func (r *runner) idleTunnels(s *system) error {
	runtime.GC()
	time.Sleep(300 * time.Millisecond)
	before, err := rssKiB(s.pid)
	if err != nil {
		return err
	}
	hs, err := openConns(r.idle, func() (*hconn, error) {
		h, err := r.cl.tunnel(s)
		if err != nil {
			return nil, err
		}
		if err := h.get(); err != nil {
			h.c.Close()
			return nil, err
		}
		return h, nil
	})
	if err != nil {
		return err
	}
	time.Sleep(time.Second)
	after, err := rssKiB(s.pid)
	closeAll(hs)
	if err != nil {
		return err
	}
	r.record(mIdleRSS, s.name, (after-before)/float64(r.idle))
	// Let the proxy tear the tunnels down before the next system runs.
	time.Sleep(time.Second)
	return nil
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return math.NaN()
	}
	s := slices.Clone(v)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func (r *runner) values(measure, sys string) map[int]float64 {
	out := map[int]float64{}
	for _, s := range r.samples {
		if s.Measure == measure && s.System == sys {
			out[s.Round] = s.Value
		}
	}
	return out
}

func (r *runner) med(measure, sys string) float64 {
	var v []float64
	for _, x := range r.values(measure, sys) {
		v = append(v, x)
	}
	return median(v)
}

// ratio is the median over rounds of gateway/other for one measure.
func (r *runner) ratio(measure, other string) float64 {
	g, o := r.values(measure, gatewayName), r.values(measure, other)
	var v []float64
	for round, gv := range g {
		if ov, ok := o[round]; ok && ov > 0 && gv > 0 {
			v = append(v, gv/ov)
		}
	}
	return median(v)
}

func num(v float64) string {
	switch a := math.Abs(v); {
	case math.IsNaN(v):
		return "—"
	case a >= 1000:
		return strconv.FormatFloat(v, 'f', 0, 64)
	case a >= 100:
		return strconv.FormatFloat(v, 'f', 0, 64)
	case a >= 10:
		return strconv.FormatFloat(v, 'f', 1, 64)
	case a >= 1:
		return strconv.FormatFloat(v, 'f', 2, 64)
	case a == 0:
		return "0"
	default:
		return strconv.FormatFloat(v, 'f', 3, 64)
	}
}

func ratioText(v float64) string {
	if math.IsNaN(v) {
		return "—"
	}
	return strconv.FormatFloat(v, 'f', 2, 64) + "×"
}

func (r *runner) report(has map[string]bool, rounds int, notes []string) {
	col := func(measure, sys string) string {
		if !has[sys] {
			return "—"
		}
		return num(r.med(measure, sys))
	}
	rat := func(measure, sys string) string {
		if !has[sys] {
			return "—"
		}
		return ratioText(r.ratio(measure, sys))
	}
	rows := []struct{ label, measure string }{
		{fmt.Sprintf("bulk download, one tunnel, %d MB: MB/s (higher is better)", r.bulkBytes/1_000_000), mBulkMBs},
		{"bulk download: proxy CPU-s per GB", mBulkCPU},
		{"closed loop, 16 keep-alive conns: req/s", mClosed16},
		{"closed loop, 64 keep-alive conns: req/s", mClosed64},
		{"closed loop, 64 conns: new upstream conns per 1000 req (counted by the upstream)", mUpNew},
		{"closed loop, 64 conns: `egress_upstream_connections_total` per 1000 req", mGwUpNew},
		{"closed loop, 256 keep-alive conns: req/s", mClosed256},
		{"closed loop, 256 conns: new upstream conns per 1000 req (counted by the upstream)", mUpNew256},
		{"closed loop, 256 conns: `egress_upstream_connections_total` per 1000 req", mGwUpNew256},
		{fmt.Sprintf("open loop, %d req/s: proxy CPU-s per 1000 req", r.rate), mOpenCPU},
		{fmt.Sprintf("open loop, %d req/s: p50 latency, µs", r.rate), mOpenP50},
		{fmt.Sprintf("open loop, %d req/s: p99 latency, µs", r.rate), mOpenP99},
		{"open loop: added p50 vs direct, µs", mOpenAddP50},
		{"open loop: added p99 vs direct, µs", mOpenAddP99},
		{"OTLP export on/off: closed-loop (16) throughput ratio", mOtlpRatio},
		{"new conn (mTLS) + CONNECT + GET, 16 in parallel: per s", mNewConnRate},
		{"new conn: proxy CPU-ms per connection", mNewConnCPU},
		{fmt.Sprintf("idle tunnels (%d): proxy RSS per tunnel, KiB", r.idle), mIdleRSS},
	}
	fmt.Printf("\n%d rounds, %v per timed run, %d cores\n\n", rounds, r.duration, runtime.NumCPU())
	fmt.Println("| measure | direct | egress-gateway | Smokescreen | ghostunnel | gw/smokescreen | gw/ghostunnel |")
	fmt.Println("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
	for _, row := range rows {
		fmt.Printf("| %s | %s | %s | %s | %s | %s | %s |\n", row.label,
			col(row.measure, directName), col(row.measure, gatewayName), col(row.measure, smokeName),
			col(row.measure, ghostName), rat(row.measure, smokeName), rat(row.measure, ghostName))
	}
	fmt.Println()
	fmt.Println("Each figure is the median over rounds; each ratio is the median of the per-round ratios.")
	fmt.Println("— : not applicable, or the system was not run.")
	for _, n := range notes {
		fmt.Println(n)
	}
	if len(r.errors) > 0 {
		var e []string
		for k, v := range r.errors {
			e = append(e, fmt.Sprintf("%s %d", k, v))
		}
		sort.Strings(e)
		fmt.Println("Failed requests or connections: " + strings.Join(e, ", ") + ".")
	}
}

func mean(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	sum := 0.0
	for _, x := range xs {
		sum += x
	}
	return sum / float64(len(xs))
}
