package bench

import (
	"fmt"
	"math"
	"os"
	"slices"
	"strconv"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"
)

// modeStyle gives each mode the same color and glyph in every plot.
func modeStyle(m Mode) (i int) { return slices.Index(AllModes, m) }

// PlotB1 draws the distribution (CDF) of every measured B1 connection, per mode, on a log
// latency axis, to path (PNG).
func PlotB1(res *Results, path string) error {
	p := plot.New()
	p.Title.Text = "B1 connection setup: connect + 64 B request/response + close"
	p.X.Label.Text = "latency (µs, log scale)"
	p.Y.Label.Text = "fraction of connections"
	p.X.Scale = plot.LogScale{}
	p.X.Tick.Marker = ticks125{}
	p.Y.Min, p.Y.Max = 0, 1
	p.Legend.Top = false
	p.Legend.Left = false
	p.Legend.XOffs = -vg.Points(5)
	p.Legend.YOffs = vg.Points(5)
	p.Add(plotter.NewGrid())
	var lo, hi float64 = math.Inf(1), 0
	for _, m := range AllModes {
		lat := slices.Clone(res.B1Latencies[m])
		if len(lat) == 0 {
			continue
		}
		slices.Sort(lat)
		// Cut the far tail (above p99.9) so the body stays readable; the tables have p99.
		top := Quantile(lat, 0.999)
		lo, hi = min(lo, lat[0]), max(hi, top)
		const points = 400
		xys := make(plotter.XYs, 0, points+1)
		for k := 0; k <= points; k++ {
			q := 0.999 * float64(k) / points
			xys = append(xys, plotter.XY{X: Quantile(lat, q), Y: q})
		}
		l, err := plotter.NewLine(xys)
		if err != nil {
			return err
		}
		i := modeStyle(m)
		l.Color = plotutil.Color(i)
		l.Dashes = plotutil.Dashes(i)
		l.Width = vg.Points(1.5)
		p.Add(l)
		p.Legend.Add(string(m), l)
	}
	if hi == 0 {
		return nil
	}
	p.X.Min, p.X.Max = lo*0.9, hi*1.1
	return p.Save(8*vg.Inch, 5*vg.Inch, path)
}

// PlotB4 draws B1's median latency against the number of excluded CIDRs and of excluded
// ports, one panel each, with the spread over rounds as error bars, to path (PNG).
func PlotB4(res *Results, path string) error {
	var plots []*plot.Plot
	for _, kind := range []string{B4CIDRs, B4Ports} {
		p, err := plotB4Kind(res, kind)
		if err != nil {
			return err
		}
		if p != nil {
			plots = append(plots, p)
		}
	}
	if len(plots) == 0 {
		return nil
	}
	w, h := vg.Length(len(plots))*6*vg.Inch, 5*vg.Inch
	img := vgimg.New(w, h)
	dc := draw.New(img)
	t := draw.Tiles{Rows: 1, Cols: len(plots), PadX: vg.Points(20), PadTop: vg.Points(5), PadBottom: vg.Points(5), PadLeft: vg.Points(5), PadRight: vg.Points(10)}
	canvases := plot.Align([][]*plot.Plot{plots}, t, dc)
	for i, p := range plots {
		p.Draw(canvases[0][i])
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := (vgimg.PngCanvas{Canvas: img}).WriteTo(f); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func plotB4Kind(res *Results, kind string) (*plot.Plot, error) {
	ns := res.Params.B4Ns
	if len(ns) == 0 || len(res.Values(kind, P50, ns[0], EBPF)) == 0 {
		return nil, nil
	}
	p := plot.New()
	what := map[string]string{B4CIDRs: "excluded CIDRs (-x)", B4Ports: "excluded outbound ports (-o)"}[kind]
	p.Title.Text = "B4: connection setup p50 vs " + what
	p.X.Label.Text = "number of " + what
	p.Y.Label.Text = "p50 latency (µs, log scale)"
	p.Y.Scale = plot.LogScale{}
	p.Y.Tick.Marker = ticks125{}
	p.Legend.Top = true
	p.Legend.Left = true
	p.Legend.XOffs = vg.Points(5)
	labels := make([]string, len(ns))
	for i, n := range ns {
		labels[i] = strconv.Itoa(n)
	}
	p.NominalX(labels...)
	p.Add(plotter.NewGrid())
	lo, hi := math.Inf(1), 0.0
	for _, m := range AllModes {
		var pts errPoints
		for i, n := range ns {
			s := Summarize(res.Values(kind, P50, n, m))
			if s.N == 0 {
				continue
			}
			// Modes are nudged sideways a little so their error bars do not hide each other.
			x := float64(i) + 0.03*float64(modeStyle(m)-len(AllModes)/2)
			pts = append(pts, errPoint{x: x, y: s.Median, lo: s.Median - s.Min, hi: s.Max - s.Median})
			lo, hi = min(lo, s.Min), max(hi, s.Max)
		}
		if len(pts) == 0 {
			continue
		}
		i := modeStyle(m)
		l, sc, err := plotter.NewLinePoints(pts)
		if err != nil {
			return nil, err
		}
		l.Color, l.Dashes, l.Width = plotutil.Color(i), plotutil.Dashes(i), vg.Points(1.5)
		sc.Color, sc.Shape = plotutil.Color(i), plotutil.Shape(i)
		eb, err := plotter.NewYErrorBars(pts)
		if err != nil {
			return nil, err
		}
		eb.Color = plotutil.Color(i)
		p.Add(l, sc, eb)
		p.Legend.Add(string(m), l, sc)
	}
	p.Y.Min, p.Y.Max = lo*0.8, hi*1.6 // room for the legend
	return p, nil
}

type errPoint struct{ x, y, lo, hi float64 }
type errPoints []errPoint

func (e errPoints) Len() int                        { return len(e) }
func (e errPoints) XY(i int) (float64, float64)     { return e[i].x, e[i].y }
func (e errPoints) YError(i int) (float64, float64) { return e[i].lo, e[i].hi }

// ticks125 labels a log axis at 1, 2 and 5 times powers of ten, with unlabelled minor ticks
// in between (gonum's LogTicks labels powers of ten only, often none on a short range).
type ticks125 struct{}

func (ticks125) Ticks(lo, hi float64) []plot.Tick {
	if lo <= 0 || hi <= lo {
		return nil
	}
	var ts []plot.Tick
	for e := math.Floor(math.Log10(lo)); math.Pow(10, e) <= hi; e++ {
		base := math.Pow(10, e)
		for m := 1; m <= 9; m++ {
			v := float64(m) * base
			if v < lo || v > hi {
				continue
			}
			t := plot.Tick{Value: v}
			if m == 1 || m == 2 || m == 5 {
				t.Label = strconv.FormatFloat(v, 'f', -1, 64)
			}
			ts = append(ts, t)
		}
	}
	if len(ts) == 0 {
		ts = []plot.Tick{{Value: lo, Label: fmt.Sprintf("%.3g", lo)}, {Value: hi, Label: fmt.Sprintf("%.3g", hi)}}
	}
	return ts
}
